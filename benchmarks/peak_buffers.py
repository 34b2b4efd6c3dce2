"""What XLA:CPU holds at the compiled step's peak, next to what memory.estimate counts there.

    python benchmarks/peak_buffers.py --points 2,9,10 --policy bf16 \
        --out benchmarks/results/peak_buffers_bf16.json

For each point of benchmarks/memory.py's GRID: compiles the training step (as the grid does,
``memory.measure``) with XLA's buffer-assignment dump, reads the live set at the peak
(``*-live-range.txt``: "Live ranges at N (peak)"), and sorts its buffers into

* ``arguments``: the buffers live from the first instruction: the step's parameters
  (parameters, optimizer state, BatchNorm statistics, the input shard),
* ``kernels``: kernel-shaped buffers (``[k,k,k,cin,cout]``, their transposes) — with a 16-bit
  compute dtype, the casts kept for the backward,
* ``saved``: other buffers live for over ``--long`` instructions (the forward's saved tensors),
* ``working``: the rest (the backward unit's gradients and copies),

each split by dtype, beside the estimate's parts at its peak unit (kept, working set) — the
evidence behind the 16-bit terms of hrseg/memory/backward.py (docs/design/memory-estimation.md).
One child process per point (the fake-device count is fixed at import).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--child" in sys.argv and "jax" not in sys.modules:
    _n = int(sys.argv[sys.argv.index("--devices") + 1])
    _dump = sys.argv[sys.argv.index("--dump") + 1]
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={_n} --xla_dump_to="
                               f"{_dump} --xla_dump_hlo_module_re=.*train_step.*")

import argparse
import collections
import glob
import json
import math
import re
import subprocess
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20
KERNEL = re.compile(r"\w+\[([1-3],[1-3],[1-3],\d+,\d+|\d+,[1-3],[1-3],[1-3],\d+)\]")  # k³ kernels


def peak_live(dump: str, long: int) -> dict:
    """The live set at the peak of the dumped train step, sorted (see the module docstring)."""
    ranges = sorted(glob.glob(os.path.join(dump, "*train_step*after_optimizations-live-range.txt")))
    if not ranges:
        raise SystemExit(f"peak_buffers: error: no live-range dump of the train step in "
                         f"{dump}")
    with open(ranges[-1]) as f:
        lines = f.read().splitlines()
    with open(ranges[-1].replace("-live-range.txt", ".txt")) as f:
        hlo = f.read()
    at = next(i for i, line in enumerate(lines) if "(peak)" in line)
    span = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in (
        re.match(r"\s+(\S+)\{.*\}:(\d+)-(\d+)$", line) for line in lines[:at]) if m}
    parts, total = collections.Counter(), 0
    for line in lines[at + 1:]:
        m = re.match(r"\s+(\S+)\{.*\}: (\d+) bytes", line)
        if not m:
            break
        name, size = m.group(1), int(m.group(2))
        shape = re.search(r"\n\s*(?:ROOT )?%?" + re.escape(name) + r" = (\S+) ", hlo)
        shape = shape.group(1) if shape else "?"
        start, end = span.get(name, (1, 1))
        kind = ("arguments" if start == 0 else "kernels" if KERNEL.match(shape)
                else "saved" if end - start > long else "working")
        parts[f"{kind} {shape.split('[')[0].lstrip('(')}"] += size
        total += size
    return {"peak_instruction": int(re.search(r"at (\d+)", lines[at]).group(1)),
            "live_MiB": round(total / MiB, 1),
            "live_by_kind_MiB": {k: round(v / MiB, 1) for k, v in parts.most_common() if v}}


def child(args) -> dict:
    import memory as grid_bench

    from hrseg import memory
    i, preset, res, mesh, batch, gather = grid_bench.grid_points(str(args.point))[0]
    cfg = grid_bench.point_config(preset, res, gather)
    meas = memory.measure(cfg, (res,) * 3, mesh, args.policy, batch=batch)
    est = memory.estimate(cfg, (res,) * 3, mesh, args.policy, batch=batch, platform="cpu")
    fixed = sum(est[k] for k in ("param_bytes", "optimizer_bytes", "state_bytes",
                                 "input_bytes"))
    return {"point": i, "preset": preset, "resolution": res, "mesh": list(mesh),
            "batch": batch, "gather_below": gather, "policy": args.policy,
            "compiled_MiB": round(meas["total"] / MiB, 1),
            "compiled": peak_live(args.dump, args.long),
            "estimate": {"total_MiB": round(est["total"] / MiB, 1), "peak_unit": est["peak_unit"],
                         "arguments_MiB": round(fixed / MiB, 1),
                         "kept_MiB": round(est["kept_bytes"] / MiB, 1),
                         "working_MiB": round(est["workspace_bytes"] / MiB, 1)}}


def main() -> int:
    import record
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="2,9,10", help="GRID indices (benchmarks/memory.py)")
    ap.add_argument("--policy", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--long", type=int, default=200,
                    help="instructions a buffer lives to count as saved (default 200)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--point", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import memory as grid_bench
    rows = []
    for i, *pt in grid_bench.grid_points(args.points):
        with tempfile.TemporaryDirectory() as dump:
            cmd = [sys.executable, __file__, "--child", "--point", str(i), "--policy",
                   args.policy, "--long", str(args.long), "--devices",
                   str(math.prod(pt[2])), "--dump", dump]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.stderr.write(done.stderr[-2000:])
                raise SystemExit(f"peak_buffers: error: point {i} failed (exit "
                                 f"{done.returncode})")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"point {i}: compiled {rows[-1]['compiled_MiB']} MiB, live at the peak "
                  f"{rows[-1]['compiled']['live_MiB']} MiB; estimate "
                  f"{rows[-1]['estimate']['total_MiB']} MiB", file=sys.stderr)
    record.emit({**record.header(), "points": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
