"""benchmarks/accelerator.py --small on the CPU: every part runs and reports what it measured."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_accel", ROOT / "benchmarks" /
                                                  "accelerator.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.main(["--json", "--small", "--budget", "1MiB"])


@pytest.mark.slow
def test_small_run_on_cpu_reports_compiled_figures_throughput_and_largest_cube(report):
    _, out = report
    assert out["platform"] == "cpu" and out["small"] and out["real_peak_bytes"] is False
    rows = out["ablation"]["16x16x16"]["rows"]
    assert [r["row"] for r in rows] == ["baseline", "+mixed precision"]
    assert all(r["compiled"] > 0 and "peak" not in r for r in rows)  # CPU: no real peaks
    frac = out["ablation"]["16x16x16"]["compiled_fraction"]
    assert frac == round(rows[-1]["compiled"] / rows[0]["compiled"], 3) and 0 < frac < 1
    for model in ("hrseg", "stock_flax"):
        t = out["throughput"]["16"][model]
        assert t["s_per_step"] > 0
        assert t["voxels_per_s"] == pytest.approx(16 ** 3 / t["s_per_step"], rel=1e-3)
    cube = out["largest_cube"]
    assert "compiled step <= --budget 1048576" in cube["criterion"]
    # 1 MiB holds the memory-efficient tiny net at 8³ at least, never more than the baseline's
    assert cube["memory_efficient"] in (8, 16)
    assert cube["baseline"] in (None, 8, 16) and (cube["baseline"] or 0) <= cube["memory_efficient"]


def test_unknown_part_is_refused():
    spec = importlib.util.spec_from_file_location("bench_accel2", ROOT / "benchmarks" /
                                                  "accelerator.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--part", "nosuch"])
    assert set(mod.SIZES) == {"full", "small"}
    assert mod.SIZES["full"]["ablation"] == [(96, 96, 96), (256, 256, 152)]
    assert mod.SIZES["full"]["throughput"] == [128, 256]
