"""benchmarks/peak_buffers.py: the peak's live set read from XLA's dump and sorted the way
docs/design/memory-estimation.md quotes it."""
import importlib.util
from pathlib import Path

import pytest

LIVE = """HloLiveRange (max 40):
  InstructionSequence:
    0:param.1
  BufferLiveRange:
    param.1{}:0-40
    wrapped_convert.3{}:2-35
    select_fusion.7{}:5-31
    transpose_copy_fusion.2{}:29-31
    convolution.9{}:30-32
  Live ranges at 30 (peak):
    param.1{}: 1000 bytes (cumulative: 1000 bytes)
    wrapped_convert.3{}: 2000 bytes (cumulative: 3000 bytes)
    select_fusion.7{}: 3000 bytes (cumulative: 6000 bytes)
    transpose_copy_fusion.2{}: 4000 bytes (cumulative: 10000 bytes)
    convolution.9{}: 5000 bytes (cumulative: 15000 bytes)
"""
HLO = """HloModule jit_train_step
  %param.1 = f32[3,3,3,4,8]{4,3,2,1,0} parameter(0)
  %wrapped_convert.3 = bf16[3,3,3,4,8]{4,3,2,1,0} fusion(%param.1)
  %select_fusion.7 = bf16[1,8,8,8,4]{4,3,2,1,0} fusion(%x)
  %transpose_copy_fusion.2 = f32[4,8,8,8,1]{4,3,2,1,0} fusion(%y)
  %convolution.9 = f32[1,8,8,8,4]{4,3,2,1,0} convolution(%a, %b)
"""


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_peak_buffers", Path(__file__).parent.parent / "benchmarks" / "peak_buffers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_live_set_is_sorted_into_arguments_kernels_saved_and_working(tmp_path):
    stem = "module_0001.jit_train_step.cpu_after_optimizations"
    (tmp_path / f"{stem}-live-range.txt").write_text(LIVE)
    (tmp_path / f"{stem}.txt").write_text(HLO)
    got = _bench().peak_live(str(tmp_path), long=20)
    assert got["peak_instruction"] == 30
    mib = 2 ** 20
    assert got["live_MiB"] == round(15000 / mib, 1)
    kinds = {k: v for k, v in got["live_by_kind_MiB"].items()}
    # param.1 lives from instruction 0: an argument; the bf16 kernel cast; a tensor saved over
    # 26 instructions; the two short-lived float32 buffers of the backward unit
    assert set(kinds) == {"arguments f32", "kernels bf16", "saved bf16", "working f32"}
    bench = _bench()
    assert bench.KERNEL.match("f32[3,3,3,256,128]") and bench.KERNEL.match("f32[64,3,3,3,32]")
    assert not bench.KERNEL.match("f32[1,64,64,64,256]")
    with pytest.raises(SystemExit, match="no live-range dump"):
        bench.peak_live(str(tmp_path / "missing"), long=20)
