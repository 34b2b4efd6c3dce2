"""Per-device memory of training steps: the PM1–PM4 figures of issue 3, as one JSON object.

    python benchmarks/memory.py --json                 # every part (a few minutes)
    python benchmarks/memory.py --json --part pm3      # one part: pm1 | pm2 | pm3 | pm4
    python benchmarks/memory.py --part grid --out benchmarks/results/memory_grid.json

Memory is the compiled step's ``memory_analysis()`` per device (argument + output − alias +
temp) on ShapeDtypeStructs: nothing is allocated, so 512 fake CPU devices compile on a laptop.
Each part runs in its own process with the fake-device count it needs (PM3: 512).
``--memory-scheduler`` compiles with XLA:CPU's memory-minimizing scheduler instead of the default
concurrency-optimized one, for comparison. (The default one runs backward-only work as early as
its inputs allow; the model code ties that work to the incoming gradient — halo.after — so it
stays in the backward pass under either.)

* PM1  mtf() 3D U-Net at 128³, batch 1: P ∈ {1, 8, 64} spatial devices (halo backend), and
       a plain single-device flax U-Net (nnx.Conv / nnx.BatchNorm / nnx.ConvTranspose) of the
       same architecture. Ratios use the step's temp bytes (activations, gradients, workspace),
       which partitioning divides; arguments (replicated parameters and optimizer state) are
       listed beside them. Target: ratio ≤ 1.10 at P = 8 and 64; P = 1 ≤ 1.05 × plain flax.
       levels_p8 / levels_p64: per U-Net level and device, the block, one feature map's bytes
       and the margins a 3³ conv receives, against the ideal (global / P). ``--gather-below N``
       compiles with model.gather_below = N (thin levels all-gathered, parallel/submesh.py);
       ``--pm1-p 1,64`` compiles only those device counts (each is minutes on 2 cores).
* PM2  gspmd backend / halo backend per-device total at P = 64. Target ≥ 5. Both run the same
       model code, whose up-sampling is einsum + reshape; pm2_gspmd_plain_flax_over_halo_p64
       is GSPMD on PM1's stock flax U-Net (nnx.ConvTranspose, i.e. lax.conv_transpose).
* PM3  paper(512) bf16, batch 8, 2 (data) × 4×8×8 (spatial) = 512 devices: per-device total
       (target ≤ 16 GiB). pm3_estimate_error: |the planner's answer − measured| / measured
       (target ≤ 10 %), where the planner (hrseg memory: 16 GiB, 512 devices) confirms its
       pick by compiling and answers that figure, and "measured" compiles the mesh and model
       it picked again here; pm3_analytic_error: the analytic estimate alone on the PM3 mesh.
       The same in fp32 (_fp32), where XLA:CPU compiles the dtype as asked.
       pm3_activation_error: the estimate's activations against what ``jax.vjp`` saves on one
       device's block (memory.residuals), which no compiler schedule changes.
* PM4  Wang ablation (wang_baseline, single device, batch 1, Adam) at 96³ and 256×256×152:
       params and memory per row; all techniques ≤ 35 % of baseline memory, params ≤ 30 %.
       pm4_memory_fraction is XLA:CPU's compiled figure; pm4_traced_fraction counts the
       activations as what ``jax.vjp`` saves (hrseg/ablation.py says why the two differ).
       Third column, Wang's "256 × 256 × full": the largest bucket of the phantom dataset's
       native-size cases (``--pm4-cases`` cases, 80–200 slices kept, 256 × 256 in-plane;
       data/buckets.py), compiled: pm4_native_fraction / pm4_native_bytes_baseline.
* grid The analytic estimate against the compiled step, bf16 and fp32, over GRID: presets
       mtf / paper / wang_baseline / wang_compact, resolutions 64–512, 1–512 devices (the large volumes
       only on many devices, so every shard stays small enough to compile in a minute or
       two), batch 1–8, model.gather_below off and on. Per point: both totals and
       ``error = (estimate − compiled) / compiled``; grid_worst_error_{bf16,fp32}: the
       largest |error| (target ≤ 10 %, what `hrseg memory` answers without compiling).
       One child process per device count (the fake-device count is fixed at import).
"""
from __future__ import annotations

import os
import subprocess
import sys

DEVICES = {"pm1": 64, "pm2": 64, "pm3": 512, "pm4": 1, "grid": 512}
# (preset, cube size, (data, sx, sy, sz), global batch, model.gather_below)
GRID = (
    ("mtf", 64, (1, 1, 1, 1), 1, 0),
    ("wang_baseline", 64, (1, 1, 1, 1), 2, 0),
    ("paper", 64, (1, 1, 1, 1), 1, 0),
    ("mtf", 128, (1, 2, 2, 2), 1, 0),
    ("mtf", 128, (2, 2, 2, 1), 4, 16),
    ("paper", 128, (1, 2, 2, 2), 1, 0),
    ("wang_baseline", 128, (4, 2, 1, 1), 8, 0),
    ("paper", 256, (1, 4, 4, 4), 1, 8),
    ("wang_baseline", 256, (2, 2, 4, 4), 2, 16),
    ("mtf", 512, (1, 8, 8, 8), 1, 16),
    ("mtf", 64, (1, 2, 2, 2), 1, 0),          # small blocks (32³) exchanging halos
    ("paper", 64, (2, 2, 2, 1), 2, 0),
    # 12–15: compiled after the estimate's 16-bit terms were revised on 0–11, to check them
    ("wang_compact", 128, (1, 1, 1, 1), 1, 0),   # depthwise + pointwise units
    ("mtf", 256, (1, 2, 2, 2), 1, 0),
    ("wang_baseline", 128, (1, 2, 2, 1), 2, 0),
    ("mtf", 256, (1, 4, 4, 4), 1, 8),           # levels gathered on 64 devices
)
PM1_P = "1,8,64"
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

if __name__ == "__main__" and "--child" in sys.argv and "jax" not in sys.modules:
    part = sys.argv[sys.argv.index("--part") + 1]
    n = (int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv
         else DEVICES[part])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import datetime
import json
import math
import platform

GiB = 2 ** 30


def _plain_flax_unet(cfg, in_channels=1):
    """The mtf() architecture written with stock flax layers (PM1's single-device reference)."""
    import jax
    import jax.numpy as jnp
    from flax import linen, nnx

    class PlainUNet(nnx.Module):
        def __init__(self, rngs):
            f = [cfg.base * 2 ** i for i in range(cfg.levels)]
            conv = lambda a, b, k=3: nnx.Conv(a, b, (k,) * 3, padding="SAME", use_bias=False,
                                              rngs=rngs)
            bn = lambda c: nnx.BatchNorm(c, momentum=cfg.bn_momentum, epsilon=cfg.bn_eps,
                                         rngs=rngs)
            block = lambda a, b: nnx.List([nnx.List([conv(a if i == 0 else b, b), bn(b)])
                                           for i in range(cfg.convs_per_block)])
            self.down = nnx.List([block(in_channels if i == 0 else f[i - 1], f[i])
                                  for i in range(cfg.levels)])
            self.ups = nnx.List([nnx.ConvTranspose(f[i + 1], f[i], (2, 2, 2), strides=(2, 2, 2),
                                                   use_bias=False, rngs=rngs)
                                 for i in range(cfg.levels - 1)])
            self.up = nnx.List([block(2 * f[i], f[i]) for i in range(cfg.levels - 1)])
            self.head = conv(f[0], cfg.classes, 1)

        def _block(self, blk, x, train):
            for c, b in blk:
                x = jax.nn.leaky_relu(b(c(x), use_running_average=not train), 0.1)
            return x

        def __call__(self, x, train=False):
            skips = []
            for i, blk in enumerate(self.down):
                x = self._block(blk, x, train)
                if i < cfg.levels - 1:
                    skips.append(x)
                    x = linen.max_pool(x, (2, 2, 2), (2, 2, 2))
            for i in reversed(range(cfg.levels - 1)):
                x = jnp.concatenate([self.ups[i](x), skips[i]], -1)
                x = self._block(self.up[i], x, train)
            return self.head(x).astype(jnp.float32)

    return PlainUNet(nnx.Rngs(0))


def pm1(args) -> dict:
    import dataclasses

    from hrseg import memory
    from hrseg.nn import unet
    cfg = unet.preset("mtf")
    if args.gather_below is not None:
        cfg = dataclasses.replace(cfg, gather_below=args.gather_below)
    s = args.pm1_size
    shape = (1, s, s, s, 1)
    out = {"size": s, "gather_below": cfg.gather_below}
    ps = [int(p) for p in args.pm1_p.split(",")]
    for p, mesh, backend in [(1, (1, 1, 1), "none"), (8, (2, 2, 2), "halo"),
                             (64, (4, 4, 4), "halo")]:
        if p > 1:
            out[f"levels_p{p}"] = level_table(cfg, s, mesh)
        if p in ps:
            out[f"p{p}"] = memory.measure(cfg, shape, mesh, backend=backend)
    for p in (8, 64):
        if f"p{p}" in out and "p1" in out:
            out[f"ratio_p{p}"] = round(out[f"p{p}"]["temp"] * p / out["p1"]["temp"], 3)
            out[f"total_ratio_p{p}"] = round(out[f"p{p}"]["total"] * p / out["p1"]["total"],
                                             3)
    if "p1" in out and args.pm1_p == PM1_P:
        out["plain_flax_p1"] = memory.measure(cfg, shape, (1, 1, 1), backend="none",
                                              model_fn=lambda: _plain_flax_unet(cfg))
        out["p1_vs_plain"] = round(out["p1"]["total"] / out["plain_flax_p1"]["total"], 3)
    return out


def level_table(cfg, size: int, mesh) -> list[dict]:
    """Per U-Net level at ``size``³ on a ``mesh`` (sx, sy, sz) of spatial devices, per device:
    the block (whole on the axes the level gathers, model.gather_below), one feature map's
    bytes, the margins one 3³ conv receives, and both against the ideal (global bytes / P)."""
    import math

    from hrseg.nn import precision, unet
    from hrseg.parallel import partition, submesh
    p = math.prod(mesh)
    itemsize = precision.policy(cfg.precision).compute_bytes
    local = [size // n for n in mesh]
    plan = (submesh.level_plan((1, *local, 1), cfg.levels, cfg.gather_below, devices=mesh)
            if cfg.gather_below else [()] * cfg.levels)
    rows = []
    for lv, c in enumerate(unet.filters(cfg)):
        g = size // 2 ** lv
        split = [a not in plan[lv] and n > 1 for a, n in zip(partition.SPATIAL, mesh)]
        block = [g // n if s else g for s, n in zip(split, mesh)]
        act = math.prod(block) * c * itemsize
        halo = (math.prod(b + 2 if s else b for b, s in zip(block, split)) - math.prod(block)
                ) * c * itemsize
        ideal = g ** 3 * c * itemsize / p
        rows.append({"level": lv, "block": "×".join(map(str, block)),
                     "gathered": "".join(plan[lv]) or "-", "channels": c,
                     "activation_bytes": act, "halo_bytes": halo, "ideal_bytes": round(ideal),
                     "activation_vs_ideal": round(act / ideal, 3),
                     "with_halo_vs_ideal": round((act + halo) / ideal, 3)})
    return rows


def pm2(args) -> dict:
    from hrseg import memory
    from hrseg.nn import unet
    cfg = unet.preset("mtf")
    s = args.pm1_size
    out = {b: memory.measure(cfg, (1, s, s, s, 1), (4, 4, 4), backend=b)
           for b in ("halo", "gspmd")}
    # GSPMD on the stock flax U-Net (nnx.ConvTranspose = lax.conv_transpose up-sampling)
    out["gspmd_plain_flax"] = memory.measure(cfg, (1, s, s, s, 1), (4, 4, 4), backend="gspmd",
                                             model_fn=lambda: _plain_flax_unet(cfg))
    for k in ("gspmd", "gspmd_plain_flax"):
        out[f"{k}_over_halo_p64"] = round(out[k]["total"] / out["halo"]["total"], 3)
    return out


def pm3(args) -> dict:
    from hrseg import memory
    from hrseg.memory import analytic, planner
    from hrseg.nn import unet
    cfg = unet.preset("paper", 512)
    split = planner.spatial_splits(256, (512,) * 3, unet.poolings_of(cfg))[0]
    mesh = (2,) + split
    out = {"mesh": mesh}
    # bf16 is the target; fp32 cross-checks the estimate where XLA:CPU keeps the dtype (it
    # computes bf16 convolutions in float32, an accelerator does not)
    for pol, suffix in (("bf16", ""), ("fp32", "_fp32")):
        est = memory.estimate(cfg, (512,) * 3, mesh, pol, batch=8)
        meas = memory.measure(cfg, (512,) * 3, mesh, pol, batch=8)
        # what jax.vjp saves on one device's block (the halo conv keeps its unpadded input)
        traced = memory.residuals(cfg, est["local_shape"], pol)["bytes"]
        est.pop("layers")
        # the planner's answer (hrseg memory: 16 GiB, 512 devices, confirmed by compiling the
        # step of its pick): the figure it answers is XLA's, so its error is that of the
        # compile itself; its own estimate beside it is the analytic error on its mesh
        ans = planner.plan(16 * GiB, 512, 512, batch=8, model_cfg=analytic.with_precision(
            cfg, pol), compile="here")
        out.update({"params": est["params"], f"estimate{suffix}": est, f"measured{suffix}": meas,
                    f"bytes_per_device{suffix}": meas["total"],
                    f"analytic_error{suffix}": round(abs(est["total"] - meas["total"])
                                                     / meas["total"], 3),
                    f"planner{suffix}": {"mesh": ans.mesh, "technique": ans.technique,
                                         "used": ans.used, "total": ans.total,
                                         "analytic_total": ans.estimate["total"],
                                         "checked": ans.checked},
                    f"estimate_error{suffix}": round(abs(ans.total - ans.compiled["total"])
                                                     / ans.compiled["total"], 3),
                    f"planner_analytic_error{suffix}": round(
                        abs(ans.estimate["total"] - ans.compiled["total"])
                        / ans.compiled["total"], 3),
                    f"traced_activation_bytes{suffix}": traced,
                    f"activation_error{suffix}": round(abs(est["activation_bytes"] - traced)
                                                       / traced, 4)})
    return out


def pm4(args) -> dict:
    from hrseg import memory
    out = {}
    for shape in [(96, 96, 96), (256, 256, 152)]:
        native = None
        if shape == (256, 256, 152):   # and Wang's "256 × 256 × full": the largest bucket
            out["native"] = memory.phantom_bucket(cases=args.pm4_cases, seed=0)
            native = out["native"]["largest"]
        rows = memory.ablation(shape, batch=1, compiled=True, native=native)
        out["×".join(map(str, shape))] = rows
        print(memory.format_table(rows), file=sys.stderr)
    last = out["256×256×152"][-1]
    out["native_bytes_baseline"] = out["256×256×152"][0]["native"]
    out["native_fraction"] = last["native_fraction"]
    out["memory_fraction"] = last["measured_fraction"]
    out["estimate_fraction"] = last["estimate_fraction"]
    out["traced_fraction"] = last["traced_fraction"]
    out["param_fraction"] = last["params_fraction"]
    return out


def grid_points(only: str | None = None) -> list[tuple]:
    """GRID, or the points whose indices ``only`` lists ("0,3")."""
    keep = None if not only else {int(i) for i in only.split(",")}
    return [(i, *pt) for i, pt in enumerate(GRID) if keep is None or i in keep]


def point_config(preset: str, res: int, gather: int):
    """The model of a GRID point (``paper``'s schedule depends on the resolution)."""
    import dataclasses

    from hrseg.nn import unet
    return dataclasses.replace(unet.preset(preset, res if preset == "paper" else None),
                               gather_below=gather)


def grid(args) -> dict:
    """The points of ``args.grid_points`` that need ``args.devices`` devices: estimate and
    compiled step, bf16 and fp32 (the parent runs one child per device count)."""
    import math

    from hrseg import memory
    rows = []
    for i, preset, res, mesh, batch, gather in grid_points(args.grid_points):
        if math.prod(mesh) != args.devices:
            continue
        cfg = point_config(preset, res, gather)
        row = {"point": i, "preset": preset, "resolution": res, "mesh": list(mesh),
               "devices": math.prod(mesh), "batch": batch, "gather_below": gather}
        for pol in ("bf16", "fp32"):
            est = memory.estimate(cfg, (res,) * 3, mesh, pol, batch=batch,
                                  platform="cpu")
            meas = memory.measure(cfg, (res,) * 3, mesh, pol, batch=batch)
            est.pop("layers")
            row["local_shape"] = list(est["local_shape"])
            row[pol] = {"estimate": est["total"], "compiled": meas["total"],
                        "error": round((est["total"] - meas["total"]) / meas["total"], 4),
                        "estimate_parts": {k: v for k, v in est.items()
                                           if k.endswith("_bytes")},
                        "compiled_parts": {k: meas[k] for k in ("argument", "output", "alias",
                                                                 "temp")},
                        "compile_s": meas["compile_s"]}
            print(f"grid {i} {preset} {res} {mesh} b{batch} g{gather} {pol}: "
                  f"{row[pol]['error']:+.3f} (compiled {meas['total']} B, "
                  f"{meas['compile_s']} s)", file=sys.stderr, flush=True)
        rows.append(row)
    return {"points": rows}


def rescore(path: str) -> dict:
    """A grid JSON's points re-estimated with this checkout's memory.estimate, the compiled
    figures kept (they do not depend on the estimate): ``--rescore FILE``, no compiling."""
    from hrseg import memory
    olds = []
    for one in path.split(","):   # several runs' points (each run's own device counts)
        with open(one) as f:
            olds.append(json.load(f))
    rows = [r for o in olds for r in o["grid"]["points"]]
    for row in rows:
        cfg = point_config(row["preset"], row["resolution"], row["gather_below"])
        for pol in ("bf16", "fp32"):
            est = memory.estimate(cfg, (row["resolution"],) * 3, tuple(row["mesh"]), pol,
                                  batch=row["batch"], platform="cpu")   # XLA:CPU's figures
            r = row[pol]
            r["estimate"] = est["total"]
            r["error"] = round((est["total"] - r["compiled"]) / r["compiled"], 4)
            r["estimate_parts"] = {k: v for k, v in est.items() if k.endswith("_bytes")}
    out = _grid_summary(rows)
    out["compiled_by"] = [{k: o.get(k) for k in ("command", "date", "jax", "machine")}
                          for o in olds]
    out["failed"] = [n for o in olds for n in o["grid"].get("failed", [])]
    return out


def _grid_summary(rows: list[dict]) -> dict:
    out = {"points": sorted(rows, key=lambda r: r["point"])}
    for pol in ("bf16", "fp32"):
        errs = [r[pol]["error"] for r in rows]
        out[f"worst_error_{pol}"] = max(errs, key=abs) if errs else None
    out["grid"] = ("(preset, cube size, (data, sx, sy, sz), global batch, model.gather_below) "
                   "of each point: " + "; ".join(f"{r['preset']} {r['resolution']} "
                                                 f"{tuple(r['mesh'])} b{r['batch']} "
                                                 f"g{r['gather_below']}" for r in out["points"]))
    return out


SUMMARY = {  # summary key -> (part, key in the part's result)
    "pm1_ratio_p8": ("pm1", "ratio_p8"), "pm1_ratio_p64": ("pm1", "ratio_p64"),
    "pm1_p1_vs_plain": ("pm1", "p1_vs_plain"), "pm1_levels_p64": ("pm1", "levels_p64"),
    "pm2_gspmd_over_halo_p64": ("pm2", "gspmd_over_halo_p64"),
    "pm2_gspmd_plain_flax_over_halo_p64": ("pm2", "gspmd_plain_flax_over_halo_p64"),
    "pm3_bytes_per_device": ("pm3", "bytes_per_device"),
    "pm3_estimate_error": ("pm3", "estimate_error"),
    "pm3_estimate_error_fp32": ("pm3", "estimate_error_fp32"),
    "pm3_analytic_error": ("pm3", "analytic_error"),
    "pm3_analytic_error_fp32": ("pm3", "analytic_error_fp32"),
    "pm3_activation_error": ("pm3", "activation_error"),
    "pm4_memory_fraction": ("pm4", "memory_fraction"),
    "pm4_traced_fraction": ("pm4", "traced_fraction"),
    "pm4_param_fraction": ("pm4", "param_fraction"),
    "pm4_native_fraction": ("pm4", "native_fraction"),
    "pm4_native_bytes_baseline": ("pm4", "native_bytes_baseline"),
    "grid_worst_error_bf16": ("grid", "worst_error_bf16"),
    "grid_worst_error_fp32": ("grid", "worst_error_fp32"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    ap.add_argument("--part", choices=["all", *DEVICES], default="all")
    ap.add_argument("--pm1-size", type=int, default=128, help="cube size of PM1/PM2")
    ap.add_argument("--pm1-p", default=PM1_P,
                    help="PM1: the device counts to compile, of 1,8,64 (ratios need 1; the "
                         "stock flax reference only with all three)")
    ap.add_argument("--gather-below", type=int, default=None,
                    help="PM1: model.gather_below (all-gather a level on a mesh axis where its "
                         "per-device block is below this many voxels; 0: never; default: the "
                         "config's)")
    ap.add_argument("--pm4-cases", type=int, default=32,
                    help="phantom cases whose slice counts make PM4's native-size buckets")
    ap.add_argument("--memory-scheduler", action="store_true",
                    help="compile with XLA:CPU's memory-minimizing scheduler instead of the "
                         "default concurrency-optimized one (for comparison)")
    ap.add_argument("--grid-points", default=None,
                    help="grid: the indices of GRID to compile, e.g. 0,3 (default: all)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--rescore", default=None, metavar="GRID_JSON[,GRID_JSON]",
                    help="grid: re-estimate the points of earlier grid JSONs with this "
                         "checkout's estimate, keeping their compiled figures (no compiling)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(globals()[args.part](args)))
        return 0
    # "all" is PM1–PM4; the grid (tens of minutes on 2 cores) only when asked for
    parts = [p for p in DEVICES if p != "grid"] if args.part == "all" else [args.part]
    results = {}
    env = dict(os.environ)
    if args.memory_scheduler:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MEMORY_SCHEDULER).strip()
    base = [sys.executable, __file__, "--child", "--pm1-size", str(args.pm1_size),
            "--pm4-cases", str(args.pm4_cases), "--pm1-p", args.pm1_p]
    if args.gather_below is not None:
        base += ["--gather-below", str(args.gather_below)]
    if args.grid_points:
        base += ["--grid-points", args.grid_points]
    if args.rescore:
        results["grid"] = rescore(args.rescore)
        return _write(args, results)
    for part in parts:  # each in its own process: the fake-device count is fixed at import
        counts = (sorted({math.prod(pt[3]) for pt in grid_points(args.grid_points)})
                  if part == "grid" else [None])
        got = []
        for n in counts:
            cmd = base + ["--part", part] + (["--devices", str(n)] if n else [])
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)
            got.append({"error": f"exit {proc.returncode}"} if proc.returncode
                       else json.loads(proc.stdout.strip().splitlines()[-1]))
            if part == "grid":   # written after each child: a stopped run keeps what it has
                results[part] = _grid_summary([r for g in got for r in g.get("points", [])])
                results[part]["failed"] = [n for n, g in zip(counts, got) if "error" in g]
                _write(args, results, quiet=True)
        if part != "grid":
            results[part] = got[0]
    return _write(args, results)


def _write(args, results: dict, quiet: bool = False) -> int:
    """Print (and with --out write) the summary and every part's result, with the date, the
    command, jax's version and the machine."""
    import jax
    summary = {k: results[p].get(key) for k, (p, key) in SUMMARY.items() if p in results}
    summary["scheduler"] = "memory-minimizing" if args.memory_scheduler else "XLA:CPU default"
    summary.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "command": " ".join(["python", *sys.argv]),
        "jax": jax.__version__, "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                                            "processor": platform.processor() or
                                            platform.machine()}})
    text = json.dumps({**summary, **results}, indent=1, default=str)
    if not quiet:
        print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
