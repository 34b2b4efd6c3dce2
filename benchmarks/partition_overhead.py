"""What the 8-way partitioned training step costs over one device, and where: the wall-time
ratio and the share spent in halo exchanges and their padding, per U-Net level.

    python benchmarks/partition_overhead.py --json --size 64  [--levels 3 --base 8]
    python benchmarks/partition_overhead.py --json --size 128 --out benchmarks/results/partition_overhead_128.json

Runs on 8 fake CPU devices (set before jax is imported), so the 1-device and the 2×2×2 step
share the same host cores and do the same work plus the halos.

* ``wall_ratio_p8``: the training step (a plain-block batch-norm U-Net, Dice + CE, batch 1, Adam) on
  a 2×2×2 mesh over the same step on one device; each the median of ``--repeats`` steps, the
  two timed in alternation (paired: the median of the per-pair ratios).
  ``wall_ratio_p8_vs_alone``: the 2×2×2 step over the 1-device step timed in a process of
  one device (``p1_alone_s``, what a one-device user runs; not paired). A process's fake
  devices cost time of their own: in one of 64 (as halo_vs_gspmd.py's), the same 2×2×2 step
  took 1.40 s against 0.68–0.72 s in one of 8.
* ``levels``: per level and conv of the network, one conv's forward + backward on the 2×2×2
  mesh as the step runs it (halo.conv inside shard_map: margins exchanged with ppermute, the
  padded shard formed, the gradients' margins sent back) and the same conv with its margins
  zero instead of exchanged (``axes=(None,)*3``: no communication, the same shapes and
  arithmetic). Their difference is what the halos cost: ``exchange_s``, and ``exchange_share``
  of the halo conv's time.
* ``exchange_share_of_step``: the sum of ``exchange_s`` over the step's convs over the 2×2×2
  step's time — the figure Hou et al. give as ~5 % of training time.
* ``collectives_p8``: the collectives of the compiled 2×2×2 step (per device program), and
  ``ppermute_s``: what one ppermute of a face slab costs on these fake devices, in a chain as
  a halo exchange's dims run (the in-process rendezvous of 8 device programs on the host's
  cores: ~0.2–0.4 ms whatever the slab's size).
"""
from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:   # fake devices must be requested before jax is imported
    ALONE = "--alone" in sys.argv   # the 1-device step in a process of one device
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                               f"_device_count={1 if ALONE else 8}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from hrseg import runtime
from hrseg.config import ModelConfig
from hrseg.nn import losses, unet
from hrseg.parallel import halo, partition
from hrseg.train import step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record

SPLIT = (2, 2, 2)
LOSS = ("dice_ce", (1.0, 8.0, 16.0))  # the training loss (params/train/train_*.yaml), class weights


def _timed(fn, args, repeats: int) -> list[float]:
    jax.block_until_ready(fn(*args))          # compile and warm up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out


def convs(levels: int, base: int, in_channels: int = 1, per_block: int = 2):
    """``(level, cin, cout)`` of every 3³ conv of the U-Net (unet.py's plain blocks)."""
    out, f = [], [base * 2 ** i for i in range(levels)]
    for lv in range(levels):       # the encoder (and bottom) blocks
        out += [(lv, in_channels if lv == 0 else f[lv - 1], f[lv])]
        out += [(lv, f[lv], f[lv])] * (per_block - 1)
    for lv in range(levels - 1):   # the decoder blocks: skip + up-sampled, concatenated
        out += [(lv, 2 * f[lv], f[lv])] + [(lv, f[lv], f[lv])] * (per_block - 1)
    return out


def conv_pair(mesh, size: int, cin: int, cout: int, repeats: int) -> dict:
    """One conv's forward + backward per 2×2×2 shard, halos exchanged vs zero margins."""
    rng = np.random.default_rng(0)
    spec = P(None, "x", "y", "z", None)
    x = jax.device_put(rng.standard_normal((1, size, size, size, cin), np.float32),
                       jax.NamedSharding(mesh, spec))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, cin, cout), np.float32) * 0.1)

    def step(axes):
        conv = jax.shard_map(lambda x, w: halo.conv(x, w, axes=axes), mesh=mesh,
                             in_specs=(spec, P()), out_specs=spec)
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.square(conv(x, w))), (0, 1)))

    ex, local = step(None), step((None, None, None))
    t_ex, t_local = [], []
    for _ in range(repeats):       # alternated, so load drift hits both alike
        t_ex += _timed(ex, (x, w), 1)
        t_local += _timed(local, (x, w), 1)
    a, b = statistics.median(t_ex), statistics.median(t_local)
    return {"halo_s": a, "zero_margin_s": b, "exchange_s": a - b, "exchange_share": 1 - b / a}


def _step_runner(cfg, n: int, size: int):
    """A closure running one training step (blocking) on ``n`` devices: the halo backend on a
    2×2×2 or a 1×1×1 mesh, as `hrseg train` runs (``mesh.backend: halo``, its default, also on
    one device; the arrays are then local to the device, so the C++ direct conv runs in an
    8-device process too, where GSPMD's global arrays of backend ``none`` would not get it)."""
    opt = optax.adam(1e-3)
    graphdef, state = step.init_state(unet.build(cfg, in_channels=1, rngs=nnx.Rngs(0)), opt)
    mesh = partition.make_mesh(SPLIT if n == 8 else (1, 1, 1), devices=jax.devices()[:n])
    layout = partition.layout(mesh, "halo")
    fn = step.make_train_step(graphdef, opt, losses.get(*LOSS), layout)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, size, size, size, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=(1, size, size, size)).astype(np.int32)
    xs, ys = step.place_batch(layout, x, y)
    box = [step.replicate(layout, state)]

    def run():
        box[0], m = fn(box[0], xs, ys)
        jax.block_until_ready(m["loss"])
    run()                                   # compile and warm up
    run.hlo = lambda: fn.lower(box[0], xs, ys).compile().as_text()
    return run


def collectives(hlo: str) -> dict:
    """How many collectives of each kind the compiled step runs (per device program)."""
    return {k: len(re.findall(rf"= \S+ {k}(?:-start)?\(", hlo))
            for k in ("collective-permute", "all-reduce", "all-gather", "all-to-all")}


def ppermute_cost(mesh, size: int, channels: int, repeats: int, chain: int = 40) -> float:
    """Seconds one ppermute of a face slab (1×1×S/2×S/2×C per shard, along x) adds when each
    depends on the one before, as the dims of a halo exchange do: a chain of ``chain`` of
    them against the same chain of slab sums without them."""
    spec = P(None, "x", "y", "z", None)
    x = jax.device_put(np.ones((1, size, size, size, channels), np.float32),
                       jax.NamedSharding(mesh, spec))

    def body(send):
        def f(x):
            acc = x
            for _ in range(chain):
                piece = acc[:, :1]
                if send:
                    piece = lax.ppermute(piece, "x", [(0, 1), (1, 0)])
                acc = acc + piece.sum()
            return acc
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))

    on, off = body(True), body(False)
    t_on, t_off = [], []
    for _ in range(repeats):
        t_on += _timed(on, (x,), 1)
        t_off += _timed(off, (x,), 1)
    return (statistics.median(t_on) - statistics.median(t_off)) / chain


def _config(args) -> ModelConfig:
    return ModelConfig(preset="custom", levels=args.levels, base=args.base, norm="batch")


def alone(args) -> list[float]:
    """The 1-device step's times in this process (started with one device: ``--alone``)."""
    run = _step_runner(_config(args), 1, args.size)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times


def wall(args) -> dict:
    """The step on 1 device and on 2×2×2 in this 8-device process, alternated (paired ratio);
    then the 1-device step again in a process of its own, as one device's user runs it."""
    fns = {n: _step_runner(_config(args), n, args.size) for n in (1, 8)}
    times = {1: [], 8: []}
    for _ in range(args.repeats):
        for n in (1, 8):
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    ratio = statistics.median(b / a for a, b in zip(times[1], times[8]))
    cmd = [sys.executable, os.path.abspath(__file__), "--alone", "--size", str(args.size),
           "--levels", str(args.levels), "--base", str(args.base), "--repeats",
           str(args.repeats)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    solo = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env=env).stdout)
    p8 = statistics.median(times[8])
    return {"collectives_p8": collectives(fns[8].hlo()),
            "p1_s": statistics.median(times[1]), "p8_s": p8,
            "p1_steps": times[1], "p8_steps": times[8], "wall_ratio_p8": ratio,
            "p1_alone_s": statistics.median(solo), "p1_alone_steps": solo,
            "wall_ratio_p8_vs_alone": p8 / statistics.median(solo)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    ap.add_argument("--size", type=int, default=64, help="volume edge S of the 1×S³×1 input")
    ap.add_argument("--levels", type=int, default=3, help="U-Net levels")
    ap.add_argument("--base", type=int, default=8, help="filters at full resolution")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--skip-levels", action="store_true", help="only the step's wall ratio")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.alone:
        runtime.start(runtime.RuntimeConfig(compile_cache=""))
        print(json.dumps(alone(args)))
        return {}
    if jax.device_count() < 8:  # (imported after jax by another script: too late to ask)
        ap.error(f"needs 8 devices, found {jax.device_count()}: run it as a script")
    m = 2 ** unet.poolings_of(ModelConfig(preset="custom", levels=args.levels,
                                          base=args.base))
    if args.size % (2 * m):
        ap.error(f"--size must be a multiple of {2 * m} (2 shards per axis × 2^poolings)")
    runtime.start(runtime.RuntimeConfig(compile_cache=""))
    out = {**record.header(),
           "config": {"size": args.size, "levels": args.levels, "base": args.base,
                      "repeats": args.repeats, "mesh": SPLIT}}
    out.update(wall(args))
    if not args.skip_levels:
        mesh = partition.make_mesh(SPLIT, devices=jax.devices()[:8])
        levels, total = [], 0.0
        for lv, cin, cout in convs(args.levels, args.base):
            r = conv_pair(mesh, args.size // 2 ** lv, cin, cout, args.repeats)
            levels.append({"level": lv, "cin": cin, "cout": cout,
                           "shard": [args.size // 2 ** lv // 2] * 3, **r})
            total += r["exchange_s"]
        out["levels"] = levels
        out["exchange_s_per_step"] = total
        out["exchange_share_of_step"] = total / out["p8_s"]
        out["ppermute_s"] = ppermute_cost(mesh, args.size, args.base, args.repeats)
    out["targets"] = {"wall_ratio_p8": "<= 1.10"}
    record.emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
