"""Per-device memory of a U-Net training step: explicit halos vs GSPMD vs ideal; 8-way wall time.

    python benchmarks/halo_vs_gspmd.py --json [--size 128] [--levels 3] [--base 8]

Memory is the compiled step's ``memory_analysis()`` (arguments + outputs + temps per device) on
ShapeDtypeStructs: nothing is allocated, so P = 64 fake devices compile on a laptop. Wall time is
real: the same step on 1 device and on 8 fake CPU devices (same host cores) at --wall-size.
Prints one JSON object; the summary keys come first.
"""
from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # fake devices must be requested before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=64").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from hrseg import memory
from hrseg.config import ModelConfig
from hrseg.nn import losses, unet
from hrseg.parallel import halo, partition
from hrseg.train import step

MESHES = {1: (1, 1, 1), 8: (2, 2, 2), 64: (4, 4, 4)}
LOSS = ("dice_ce", (1.0, 8.0, 16.0))  # the training loss (params/train/train_*.yaml), class weights


def _setup(args, n_devices):
    cfg = ModelConfig(preset="custom", levels=args.levels, base=args.base, norm="batch")
    model = unet.build(cfg, in_channels=1, rngs=nnx.Rngs(0))
    opt = optax.adam(1e-3)
    graphdef, state = step.init_state(model, opt)
    mesh = partition.make_mesh(MESHES[n_devices], devices=jax.devices()[:n_devices])
    loss_fn = losses.get(*LOSS)
    return graphdef, state, opt, mesh, loss_fn


def step_bytes(args, n_devices: int, backend: str) -> dict:
    cfg = ModelConfig(preset="custom", levels=args.levels, base=args.base, norm="batch")
    out = memory.measure(cfg, (args.size,) * 3, mesh=MESHES[n_devices], backend=backend,
                         optimizer="adam", batch=1, hlo=True,
                         loss_fn=losses.get(*LOSS))
    hlo = out.pop("hlo")
    out["all_gathers"] = hlo.count("all-gather-start") + hlo.count(" all-gather(")
    out["collective_permutes"] = (hlo.count("collective-permute-start")
                                  + hlo.count(" collective-permute("))
    return out


def gspmd_with_xla_upconv_bytes(args, n_devices: int) -> dict:
    original = halo.conv_transpose
    halo.conv_transpose = halo.conv_transpose_xla  # what a plain Flax U-Net runs
    try:
        return step_bytes(args, n_devices, "gspmd")
    finally:
        halo.conv_transpose = original


def step_seconds(args, n_devices: int, backend: str, repeats: int) -> float:
    graphdef, state, opt, mesh, loss_fn = _setup(args, n_devices)
    layout = partition.layout(mesh, backend)
    fn = step.make_train_step(graphdef, opt, loss_fn, layout)
    rng = np.random.default_rng(0)
    s = args.wall_size
    x = rng.normal(size=(1, s, s, s, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=(1, s, s, s)).astype(np.int32)
    xs, ys = step.place_batch(layout, x, y)
    state = step.replicate(layout, state)
    state, m = fn(state, xs, ys)  # compile + warm up
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = fn(state, xs, ys)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object (default)")
    p.add_argument("--size", type=int, default=128, help="volume edge for the memory figures")
    p.add_argument("--wall-size", type=int, default=64, help="volume edge for the wall time")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--base", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-wall", action="store_true")
    args = p.parse_args(argv)
    if jax.device_count() < 64:
        sys.exit(f"needs 64 devices, found {jax.device_count()}: run it as a script "
                 "(it sets XLA_FLAGS before importing jax)")

    raw = {"config": {"size": args.size, "levels": args.levels, "base": args.base,
                      "wall_size": args.wall_size, "platform": jax.devices()[0].platform,
                      "host_cores": os.cpu_count()}}
    ref = step_bytes(args, 1, "none")
    raw["bytes"] = {"p1": ref}
    for P in (8, 64):
        for backend in ("halo", "gspmd"):
            raw["bytes"][f"{backend}_p{P}"] = step_bytes(args, P, backend)
    raw["bytes"]["gspmd_xla_upconv_p64"] = gspmd_with_xla_upconv_bytes(args, 64)
    ideal = {P: ref["total"] / P for P in (8, 64)}
    out = {
        "halo_over_ideal_p8": raw["bytes"]["halo_p8"]["total"] / ideal[8],
        "halo_over_ideal_p64": raw["bytes"]["halo_p64"]["total"] / ideal[64],
        "gspmd_over_halo_p64": raw["bytes"]["gspmd_p64"]["total"]
        / raw["bytes"]["halo_p64"]["total"],
        # the same comparison when the gspmd network uses XLA's transposed conv (plain Flax)
        "gspmd_xla_upconv_over_halo_p64": raw["bytes"]["gspmd_xla_upconv_p64"]["total"]
        / raw["bytes"]["halo_p64"]["total"],
    }
    if not args.skip_wall:
        t1 = step_seconds(args, 1, "none", args.repeats)
        t8 = step_seconds(args, 8, "halo", args.repeats)
        out["wall_ratio_p8"] = t8 / t1
        raw["seconds"] = {"p1_none": t1, "p8_halo": t8}
    out["targets"] = {"halo_over_ideal_p8": "<= 1.10", "halo_over_ideal_p64": "<= 1.10",
                      "gspmd_over_halo_p64": ">= 5", "wall_ratio_p8": "<= 1.05"}
    out.update(raw)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
