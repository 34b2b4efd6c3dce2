"""Memory and speed on whatever device is present (GPU, TPU, or the CPU), as one JSON object.

    python benchmarks/accelerator.py --json            # full sizes (a GPU/TPU: minutes)
    python benchmarks/accelerator.py --json --small    # CPU-sized check of the script itself

* ablation     Wang et al.'s ablation (wang_baseline + each technique, one device, batch 1, Adam)
               at 96³ and 256×256×152: on a GPU/TPU the allocator's real peak bytes of a
               training step (``memory_stats()["peak_bytes_in_use"]``, each row in its own
               process, XLA_PYTHON_CLIENT_PREALLOCATE=false), beside the compiled figure
               (``memory_analysis``); on the CPU the compiled figure only. The paper measured
               28.4 -> 11.7 GB on a V100; hrseg's target is all techniques <= 35 % of baseline.
* throughput   training voxels/s of one device at 128³ and 256³ for hrseg's mtf() U-Net and
               the same architecture in stock flax layers (benchmarks/memory.py, PM1).
* largest_cube the largest cube (of ``cubes``) whose training step fits one device, for the
               baseline and the memory-efficient network (all techniques): on a GPU/TPU a real
               step in a fresh process (no out-of-memory error); on the CPU the compiled
               figure against ``--budget``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax starts: real peaks need an allocator without a pool
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import importlib.util
import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {
    "full": {"base": "wang_baseline", "model": "mtf", "ablation": [(96, 96, 96), (256, 256, 152)],
             "throughput": [128, 256], "steps": 5,
             "cubes": [64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]},
    # tiny networks at 16³: the same code paths, seconds of compile on a CPU
    # (the ablation's first and last rows only)
    "small": {"base": "tiny", "model": "tiny", "ablation": [(16, 16, 16)], "throughput": [16],
              "steps": 2, "cubes": [8, 16], "rows": ("baseline", "+mixed precision")},
}


def _rows(base_name: str):
    from hrseg import memory
    from hrseg.nn import unet
    base = unet.preset(base_name)
    return [(name, dataclasses.replace(base, **changes)) for name, changes in memory.ABLATION]


def _stock_flax(cfg):
    spec = importlib.util.spec_from_file_location("bench_memory", HERE / "memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lambda: mod._plain_flax_unet(cfg)


def _child(args) -> list[str]:
    return [sys.executable, __file__, "--child", *map(str, args)]


def _run_child(args) -> dict:
    """One measurement in a fresh process (its allocator peak is its own)."""
    p = subprocess.run(_child(args), capture_output=True, text=True, check=False)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[-300:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def child_main(argv) -> None:
    """``--child peak BASE ROW X Y Z`` | ``--child trains BASE ROW SIZE``: one JSON line."""
    from hrseg.memory import peak
    kind, base, row, *sizes = argv
    cfg = dict(_rows(base))[row]
    shape = tuple(int(s) for s in sizes)
    if kind == "peak":
        print(json.dumps({"peak": peak.train_step_peak_bytes(cfg, shape, optimizer="adam")}))
        return
    shape = shape * 3
    try:
        peak.single_device_step(cfg, shape, optimizer="adam")(1)
        print(json.dumps({"trains": True, "peak": peak.peak_bytes_in_use()}))
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        print(json.dumps({"trains": False}))


def ablation(size: dict, on_device: bool) -> dict:
    from hrseg import memory
    out = {}
    for shape in size["ablation"]:
        rows = []
        for name, cfg in _rows(size["base"]):
            if name not in size.get("rows", (name,)):
                continue
            row = {"row": name, "compiled": memory.measure(cfg, shape, (1, 1, 1),
                                                           optimizer="adam",
                                                           backend="none")["total"]}
            if on_device:
                row["peak"] = _run_child(["peak", size["base"], name, *shape]).get("peak")
            rows.append(row)
        entry = {"rows": rows}
        for k in ("compiled", "peak"):
            if all(isinstance(r.get(k), int) for r in rows):
                entry[f"{k}_fraction"] = round(rows[-1][k] / rows[0][k], 3)
        out["x".join(map(str, shape))] = entry
    return out


def throughput(size: dict) -> dict:
    from hrseg.memory import peak
    from hrseg.nn import unet
    cfg = unet.preset(size["model"])
    out = {}
    for s in size["throughput"]:
        entry = {}
        for name, model_fn in (("hrseg", None), ("stock_flax", _stock_flax(cfg))):
            try:
                run = peak.single_device_step(cfg, (s, s, s), model_fn=model_fn)
                run(1)                                    # compile + first step
                sec = run(size["steps"]) / size["steps"]
                entry[name] = {"s_per_step": float(f"{sec:.4g}"),
                               "voxels_per_s": round(s ** 3 / sec)}
            except Exception as e:  # noqa: BLE001 (out of memory at this size: say so)
                entry[name] = {"error": str(e).splitlines()[0][:200]}
        out[str(s)] = entry
    return out


def largest_cube(size: dict, on_device: bool, budget: int) -> dict:
    from hrseg import memory
    from hrseg.nn import unet
    rows = dict(_rows(size["base"]))
    out = {"criterion": ("a real training step in a fresh process" if on_device else
                         f"compiled step <= --budget {budget} bytes (no accelerator)")}
    for label, row in (("baseline", "baseline"), ("memory_efficient", "+mixed precision")):
        mult = 2 ** unet.poolings_of(rows[row])
        cubes = [c for c in size["cubes"] if c % mult == 0]
        lo, hi, best = 0, len(cubes) - 1, None             # bisection: fits is monotone
        while lo <= hi:
            mid = (lo + hi) // 2
            if on_device:
                fits = _run_child(["trains", size["base"], row, cubes[mid]]).get("trains")
            else:
                fits = memory.measure(rows[row], (cubes[mid],) * 3, (1, 1, 1), optimizer="adam",
                                      backend="none")["total"] <= budget
            if fits:
                best, lo = cubes[mid], mid + 1
            else:
                hi = mid - 1
        out[label] = best
    out["cubes_tried_from"] = size["cubes"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--small", action="store_true", help="tiny networks at 16³ (CPU check)")
    p.add_argument("--part", nargs="+", choices=["ablation", "throughput", "largest_cube"],
                   default=["ablation", "throughput", "largest_cube"])
    p.add_argument("--budget", default="16GiB",
                   help="largest_cube on the CPU: compiled bytes per device allowed")
    args = p.parse_args(argv)
    import jax

    from hrseg import config
    from hrseg.memory import peak
    from hrseg.runtime import devices
    size = SIZES["small" if args.small else "full"]
    on_device = peak.measures_peak()
    out = {"device": devices.describe(jax.devices()[:1]), "platform": jax.default_backend(),
           "jax": jax.__version__, "small": args.small, "real_peak_bytes": on_device}
    if "ablation" in args.part:
        out["ablation"] = ablation(size, on_device)
    if "throughput" in args.part:
        out["throughput"] = throughput(size)
    if "largest_cube" in args.part:
        out["largest_cube"] = largest_cube(size, on_device, config.parse_bytes(args.budget))
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main(sys.argv[sys.argv.index("--child") + 1:])
    else:
        main()
