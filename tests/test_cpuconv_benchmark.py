"""benchmarks/cpuconv.py at toy size: it times the gradients _conv_bwd runs and agrees with XLA."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpuconv_benchmark_json_at_toy_size(tmp_path):
    out = tmp_path / "c.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    for cin in (4, 16):   # XLA's weight gradient below 16 input channels, the matmuls from 16
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpuconv.py"),
                               "--size", "8", "--cin", str(cin), "--cout", "8", "--repeats", "2",
                               "--out", str(out)],
                              capture_output=True, text=True, env=env, check=False, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        d = json.loads(out.read_text())
        assert d == json.loads(proc.stdout) and d["cin"] == cin and "cpuconv.py" in d["command"]
        assert d["native_conv"].startswith("native conv3d: on")
        assert d["max_rel_err"] < 1e-5 and all(d[f"{f}_{p}_s"] > 0 for f in ("direct", "wide")
                                               for p in ("forward", "input_grad", "weight_grad",
                                                         "all"))
        assert d["forward_ratio"] == round(d["direct_forward_s"] / d["xla_forward_s"], 3)


def test_cpuconv_benchmark_upconv_at_toy_size(tmp_path):
    out = tmp_path / "u.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpuconv.py"), "--upconv",
                           "--size", "8", "--cout", "4", "--repeats", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert (d["size"], d["cin"], d["cout"]) == (8, 8, 4)
    # both formulations' gradients agree; the ratio is the flat form's time over the einsum's
    assert d["max_rel_err"] < 1e-5
    assert d["upconv_ratio"] == round(d["upconv_flat_s"] / d["upconv_einsum_s"], 3)
