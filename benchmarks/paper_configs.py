"""Compile every params/paper/*.yaml training step on abstract inputs, as one JSON object.

    python benchmarks/paper_configs.py --json                      # all of params/paper/
    python benchmarks/paper_configs.py --json params/paper/hou_64.yaml

Each config is compiled in a child process with as many fake CPU devices as its mesh needs
(the real step of memory.compiled.run_step: model, precision, loss, optimizer and schedule,
batch, mesh; nothing allocated). Per config: the compile's wall seconds and XLA's per-device
bytes (argument + output − alias + temp; XLA:CPU, XLA's conv). tests/multidevice/test_paper_configs.py
traces and lowers the same steps; the compile itself takes minutes each, so it lives here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NATIVE = (256, 256, 256)   # resample: native — the largest bucket of KiTS19's 45-234 slices
CHILD = r"""
import json, sys, time
from hrseg import config
from hrseg.memory import compiled
cfg = config.load(sys.argv[1])
t = time.perf_counter()
fn, args = compiled.run_step(cfg, NATIVE if cfg.data.resample == "native" else None)
ma = fn.lower(*args).compile().memory_analysis()
print(json.dumps({"compile_s": round(time.perf_counter() - t, 1),
                  "bytes": ma.argument_size_in_bytes + ma.output_size_in_bytes
                           - ma.alias_size_in_bytes + ma.temp_size_in_bytes}))
""".replace("NATIVE", repr(NATIVE))


def figures(path: Path) -> dict:
    from hrseg import config
    cfg = config.load(path)
    n = cfg.mesh.data * math.prod(cfg.mesh.spatial)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                          text=True, env=env, check=False)
    out = {"config": str(path.relative_to(ROOT)), "devices": n, "wall_s": None}
    if proc.returncode:
        return out | {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return out | json.loads(proc.stdout.strip().splitlines()[-1]) | {
        "wall_s": round(time.perf_counter() - t, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", type=Path,
                   default=sorted((ROOT / "params" / "paper").glob("*.yaml")))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    rows = [figures(c.resolve()) for c in args.configs]
    result = {"benchmark": "paper_configs", "date": time.strftime("%Y-%m-%d %H:%M"),
              "configs": rows}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
