"""benchmarks/speed.py end to end at toy size: workers start, answer in turn, JSON is sane.

No timing is asserted (speed targets live in the benchmark's output, not in unit tests)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_json_at_toy_size():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--json",
                           "--preset", "tiny", "--size", "8", "--rounds", "2", "--no-torch",
                           "--malloc", "default"],
                          capture_output=True, text=True, env=env, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["frameworks"] == ["hrseg", "flax"] and "hrseg_over_torch" not in out
    assert list(out["by_malloc"]) == ["default"] and out["malloc"] == "default"
    assert out["date"] and out["machine"]["cpus"] >= 1 and "speed.py" in out["command"]
    for n in ("hrseg", "flax"):   # every worker under glibc's own allocator, as recorded
        env = out["by_malloc"]["default"]["workers"][n]["environment"]
        assert env["HRSEG_HOST_MALLOC"] == "off" and "MALLOC_ARENA_MAX" not in env, env
    out = {**out, **out["by_malloc"]["default"]}
    for n in ("hrseg", "flax"):
        r = out[n]
        assert len(r["steps"]) == len(r["infers"]) == 2
        assert all(t > 0 for t in r["steps"] + r["infers"])
        assert math.isclose(r["step_voxels_per_s"], 8 ** 3 / r["step_s"], rel_tol=1e-9)
        assert r["first_step_cold_s"] > 0 and r["first_step_warm_s"] > 0
        assert out[f"{n}_voxels_per_s"] > 0
        # the timed rounds' peak RSS, counted from after the first step (compiles excluded)
        assert 0 < r["peak_rss_bytes"] <= r["first_peak_rss_bytes"] * 4
    ratios = [a / b for a, b in zip(out["hrseg"]["steps"], out["flax"]["steps"])]
    assert math.isclose(out["hrseg_over_flax"], sum(ratios) / 2,
                        rel_tol=1e-3)   # the median of the paired per-round ratios


def test_speed_benchmark_refuses_bad_size():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--size", "12"],
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and "multiple of 8" in proc.stderr


def test_every_worker_gets_the_same_allocator_settings():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    from hrseg.runtime import hostmem
    base = {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}
    tuned, default = speed.malloc_env(base, "tuned"), speed.malloc_env(base, "default")
    assert {k: tuned[k] for k in hostmem.CHILD_ENV} == hostmem.CHILD_ENV
    assert tuned["HRSEG_HOST_MALLOC"] == "on" and default["HRSEG_HOST_MALLOC"] == "off"
    assert not set(hostmem.CHILD_ENV) & set(default) and default["PATH"] == "/bin"
    assert base == {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}       # the caller's env untouched


def test_rss_reads_this_process_and_its_peak_restarts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mmap

    import speed
    if not os.path.exists("/proc/self/clear_refs"):
        return
    before = speed.rss()
    block = mmap.mmap(-1, 64 * 2 ** 20)           # 64 MiB of its own pages (whatever malloc
    block.write(b"x" * len(block))                # keeps), touched, then unmapped
    during = speed.rss()
    block.close()
    assert during["peak_bytes"] >= before["rss_bytes"] + 60 * 2 ** 20
    speed.reset_peak()
    after = speed.rss()
    assert after["peak_bytes"] < during["peak_bytes"] - 32 * 2 ** 20   # the peak restarted
