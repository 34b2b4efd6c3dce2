"""benchmarks/partition_overhead.py at toy size: the 8-way step's wall ratio and the halo
exchange's share per conv, as one JSON object. No timing is asserted. (The benchmark runs in
processes of its own, 8 devices and 1; here to balance the two test suites' time.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_convs_lists_every_3x3x3_conv_of_the_unet():
    import partition_overhead as po
    # levels 3, base 8: encoder 1→8, 8→8 | 8→16, 16→16 | 16→32, 32→32; decoder 16→8 …
    assert po.convs(3, 8) == [(0, 1, 8), (0, 8, 8), (1, 8, 16), (1, 16, 16), (2, 16, 32),
                              (2, 32, 32), (0, 16, 8), (0, 8, 8), (1, 32, 16), (1, 16, 16)]


def test_partition_overhead_json_at_toy_size(tmp_path):
    out = tmp_path / "po.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "partition_overhead.py"),
                           "--size", "16", "--levels", "2", "--base", "2", "--repeats", "2",
                           "--out", str(out)],
                          capture_output=True, text=True, env=env, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(proc.stdout)
    assert d == json.loads(out.read_text())
    assert len(d["p1_steps"]) == len(d["p8_steps"]) == len(d["p1_alone_steps"]) == 2
    assert d["wall_ratio_p8"] > 0 and d["wall_ratio_p8_vs_alone"] == d["p8_s"] / d["p1_alone_s"]
    assert [(r["level"], r["cin"], r["cout"]) for r in d["levels"]] == [
        (0, 1, 2), (0, 2, 2), (1, 2, 4), (1, 4, 4), (0, 4, 2), (0, 2, 2)]
    assert [r["shard"] for r in d["levels"]][:3] == [[8] * 3, [8] * 3, [4] * 3]
    for r in d["levels"]:
        assert r["exchange_s"] == r["halo_s"] - r["zero_margin_s"]
    assert abs(d["exchange_s_per_step"] - sum(r["exchange_s"] for r in d["levels"])) < 1e-12
    assert d["date"] and "partition_overhead.py" in d["command"]
    # per conv on 2-way axes: 3 ppermutes (one per dim, both sides in one) for the forward's
    # halos, 3 to form them again in the backward, 3 to send the margins' gradients back;
    # the first conv's input (the image) needs no gradient
    assert d["collectives_p8"]["collective-permute"] == 9 * len(d["levels"]) - 3
    assert d["collectives_p8"]["all-reduce"] > 0 and isinstance(d["ppermute_s"], float)


def test_partition_overhead_refuses_a_size_it_cannot_split():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "partition_overhead.py"),
                           "--size", "20", "--levels", "3"],
                          capture_output=True, text=True, env=env, check=False, timeout=300)
    assert proc.returncode == 2 and "--size must be a multiple of 8" in proc.stderr
