"""Per-device memory of a training step, whole volume vs patches, as one JSON object.

    python benchmarks/patch_memory.py --json        # params/train/train_64.yaml vs train_64_patch32.yaml
    python benchmarks/patch_memory.py --json params/a.yaml params/b.yaml

For each run config: the compiled training step's per-device bytes (memory.measure:
argument + output − alias + temp, XLA:CPU, nothing allocated) and the analytic estimate, at the
shape a step really trains on (``data.patch`` if set, else ``data.resolution``), with the run's
mesh, optimizer and loss. Sliding-window inference runs the same network on patch-sized windows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = [ROOT / "params" / "train" / "train_64.yaml",
           ROOT / "params" / "train" / "train_64_patch32.yaml"]


def figures(path) -> dict:
    from hrseg import config, memory
    from hrseg.nn import losses
    cfg = config.load(path)
    shape = cfg.data.patch or cfg.data.resolution
    mesh = (cfg.mesh.data, *cfg.mesh.spatial)
    loss = losses.get(cfg.train.loss, cfg.train.ce_weights)
    m = memory.measure(cfg.model, shape, mesh, optimizer=cfg.train.optimizer,
                          batch=cfg.train.batch, backend=cfg.mesh.backend, loss_fn=loss)
    e = memory.estimate(cfg.model, shape, mesh, optimizer=cfg.train.optimizer,
                           batch=cfg.train.batch, backend=cfg.mesh.backend)
    return {"config": str(path), "train_shape": list(shape), "batch": cfg.train.batch,
            "mesh": list(mesh), "measured_bytes": m["total"], "measured_temp_bytes": m["temp"],
            "estimate_bytes": e["total"], "compile_s": m["compile_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=DEFAULT)
    p.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    args = p.parse_args(argv)
    rows = [figures(c) for c in args.configs]
    print(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
