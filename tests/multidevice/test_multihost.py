"""Multi-host for real: 2 processes × 4 fake CPU devices over loopback (gloo collectives)
take the same training steps as 1 process × 8 devices; each process loads only its rows."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hrseg import config, train

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "params" / "train" / "smoke" / "train_smoke.yaml"
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(dataset, losses_of, tmp_path):
    over = [f"data.root={dataset}", f"data.cache_dir={dataset}/cache",
            f"train.out_dir={tmp_path}", "train.steps=6", "train.batch=2",
            "train.ckpt_every=3", "train.eval_every=0", "mesh.backend=halo",
            "mesh.spatial=[1,2,2]", "mesh.data=2"]
    # 1 process × 8 devices (this pytest process); also fills the preprocessing cache
    ref = train.train(config.load(SMOKE, over + ["train.name=one"]), progress=False)

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "hrseg.cli", "train", "-f", str(SMOKE), "--quiet", "--set",
         *over, "train.name=two", "runtime.distributed=true",
         f"runtime.coordinator=127.0.0.1:{port}", "runtime.num_processes=2", f"runtime.process_id={i}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{err[-4000:]}"
        assert f"process {i}/2 loads batch rows {i}-{i} of 2" in err   # only its half

    two = losses_of(tmp_path / "two")
    np.testing.assert_allclose(two, losses_of(ref.run_dir), rtol=2e-6, atol=0)  # measured 1.2e-7
    evals = json.loads((tmp_path / "two" / "result.json").read_text())["eval"]
    for k, v in ref.eval.items():
        if isinstance(v, float) and np.isfinite(v):
            assert evals[k] == pytest.approx(v, abs=1e-4), k
    # orbax wrote the checkpoints of both processes into the one run directory
    assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [3, 6]
