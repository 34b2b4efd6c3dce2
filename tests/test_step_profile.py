"""benchmarks/step_profile.py: thunks put in kinds by their stack and op; a toy-size run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

HLO = """HloModule jit_train_step

FileNames
1 "/x/hrseg/parallel/cpuconv.py"
2 "/x/hrseg/nn/norm.py"
3 "/x/hrseg/parallel/halo.py"

FunctionNames
1 "_taps"
2 "forward_act"
3 "conv"

FileLocations
1 {file_name_id=1 function_name_id=1 line=3 end_line=3 column=0 end_column=1}
2 {file_name_id=2 function_name_id=2 line=4 end_line=4 column=0 end_column=1}
3 {file_name_id=3 function_name_id=3 line=5 end_line=5 column=0 end_column=1}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}

ENTRY %main {
  %ynn_fusion.1 = f32[1,66,4356,96]{3,2,1,0} fusion(%a), metadata={op_name="jit(train_step)/jvp()/conv_general_dilated" stack_frame_id=1}
  %mul.2 = f32[1,64,64,64,32]{4,3,2,1,0} fusion(%b), metadata={op_name="jit(train_step)/transpose(jvp())/mul" stack_frame_id=2}
  %dot_general.3 = f32[32,96]{1,0} dot(%c, %d), metadata={op_name="jit(train_step)/transpose(jvp(transpose(jvp())))/dot_general" stack_frame_id=3}
  %ynn_fusion.4 = f32[1,66,4096,96]{3,2,1,0} fusion(%e), metadata={op_name="jit(train_step)/transpose(jvp())/conv_general_dilated" stack_frame_id=3}
  %slice.5 = f32[278652,32]{1,0} fusion(%f), metadata={op_name="jit(train_step)/transpose(jvp())/slice" stack_frame_id=3}
  %convolution.6 = f32[3,3,3,1,32]{4,3,2,1,0} convolution(%g, %h), metadata={op_name="jit(train_step)/transpose(jvp())/conv_general_dilated" stack_frame_id=3}
  %ffi_call.7 = f32[1,64,64,64,32]{4,3,2,1,0} custom-call(%i, %j), custom_call_target="hrseg_conv3d", metadata={op_name="jit(train_step)/jvp()/ffi_call" stack_frame_id=3}
  %ffi_call.8 = f32[1,66,66,66,32]{4,3,2,1,0} custom-call(%k, %l), custom_call_target="hrseg_conv3d", metadata={op_name="jit(train_step)/transpose(jvp())/ffi_call" stack_frame_id=3}
  %ffi_call.9 = f32[3,3,3,32,32]{4,3,2,1,0} custom-call(%m, %n), custom_call_target="hrseg_conv3d_weight_grad", metadata={op_name="jit(train_step)/transpose(jvp())/ffi_call" stack_frame_id=3}
}
"""


def test_thunks_get_the_kind_of_their_pass():
    import step_profile as sp
    inst, stack = sp._hlo_tables(HLO)
    kinds = {n: sp.kind_of(op, stack(fid), shape, target)
             for n, (op, fid, shape, target) in inst.items()}
    assert kinds == {"ynn_fusion.1": "conv forward",
                     "mul.2": "batch norm + activation (backward)",
                     "dot_general.3": "conv weight gradient",
                     "ynn_fusion.4": "conv input gradient",
                     "slice.5": "conv backward: copies",
                     "convolution.6": "conv weight gradient",   # XLA's backprop-filter conv
                     "ffi_call.7": "conv forward",              # the C++ direct conv's calls,
                     "ffi_call.8": "conv input gradient",       # whose backward's stack is
                     "ffi_call.9": "conv weight gradient"}      # the custom VJP's call site
    assert stack(1) == ["cpuconv.py:_taps"] and sp.kind_of("", [], "") == "other"


def test_torch_ops_get_kinds():
    import step_profile as sp
    kind = lambda op: next((k for frag, k in sp.TORCH_KINDS if frag in op), "other")
    assert kind("aten::convolution_backward") == "conv input + weight gradient"
    assert kind("aten::mkldnn_convolution") == "conv forward"
    assert kind("aten::slow_conv_transpose3d") == "up-conv"
    assert kind("aten::native_batch_norm_backward") == "batch norm + activation"
    assert kind("aten::something_new") == "other"


def test_step_profile_hrseg_at_toy_size(tmp_path):
    out = tmp_path / "p.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"),
                           "--size", "16", "--preset", "tiny", "--steps", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, env=env, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    ms = d["hrseg"]["ms_per_step"]
    assert d["hrseg"]["wall_s"] > 0 and "torch" not in d
    assert ms.get("conv forward", 0) > 0 and ms.get("conv input gradient", 0) > 0, ms
    assert ms.get("other", 0) < 0.5 * sum(ms.values()), ms   # nearly every thunk has a kind
    cold = d["hrseg_cold"]
    assert all(cold[k] > 0 for k in ("setup_s", "trace_s", "lower_s", "compile_s",
                                     "first_run_s", "second_run_s")), cold
