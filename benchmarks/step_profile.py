"""Where the CPU training step's time goes: hrseg's step per op kind beside PyTorch's.

    python benchmarks/step_profile.py --json --make-torch-venv .cache/torch-venv \
        --out benchmarks/results/step_profile_<date>.json

The network and step are benchmarks/speed.py's (``unet.preset("mtf")``, one 1×S³×1 volume,
fp32, cross-entropy, Adam), each framework in its own process under hostmem.py's allocator
settings (speed.py's ``--malloc tuned``), after two warm-up steps:

* **hrseg**: ``jax.profiler`` traces ``--steps`` steps with XLA:CPU's per-thunk trace events
  (``--xla_cpu_enable_xprof_traceme``); each thunk (one HLO instruction of the compiled step,
  read from ``--xla_dump_to``) is put in a kind by the Python functions on its stack
  (the HLO's stack frames: ``cpuconv._input_grad`` → conv input gradient, ``norm.py`` → batch
  norm, optax → optimizer …) and by whether autodiff's transpose made it (backward).
* **hrseg_cold**: a fresh process's first step, in phases: set-up, trace, lower, compile,
  first and second execution (:func:`cold_start`).
* **PyTorch**: ``torch.profiler`` over the same number of steps; each ``aten::`` op's self
  time put in a kind by its name.

Per kind: milliseconds per step. Thunk and op times are the time each op ran, summed: ops that
overlap on the two cores sum to more than the step's wall time (``wall_s``, timed apart,
without the profiler). Profilers add overhead; compare kinds, not totals.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# hrseg: a thunk's kind from the innermost Python function on its stack. A custom VJP's
# backward ops carry its call site's frame (halo.py:conv), so there the op and autodiff's
# transpose tell the passes apart (conv_kind).
FRAME_KINDS = (("conv_transpose", "up-conv"), ("max_pool", "max pool"),
               ("norm.py", "batch norm + activation"), ("losses.py", "loss"),
               ("metrics.py", "loss"), ("optax", "optimizer"), ("moments", "batch norm + activation"),
               ("UpBlock", "skip concatenation"), ("unet.py", "skip concatenation"))
# PyTorch: the first fragment in an aten op's name names its kind
TORCH_KINDS = (
    ("convolution_backward", "conv input + weight gradient"),
    ("conv_transpose", "up-conv"), ("mkldnn_convolution", "conv forward"),
    ("slow_conv3d", "conv forward"), ("convolution", "conv forward"),
    ("batch_norm", "batch norm + activation"), ("leaky_relu", "batch norm + activation"),
    ("max_pool", "max pool"), ("softmax", "loss"), ("nll_loss", "loss"),
    ("cross_entropy", "loss"), ("Adam", "optimizer"), ("lerp", "optimizer"),
    ("addcdiv", "optimizer"), ("sqrt", "optimizer"), ("cat", "skip concatenation"),
    ("copy_", "copies"), ("fill_", "copies"), ("zero_", "copies"))


def warm_and_time(step, steps: int) -> list[float]:
    """Two warm-up steps, then ``steps`` timed ones (seconds each), no profiler attached."""
    step()
    step()
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        wall.append(time.perf_counter() - t)
    return wall


# ---------------------------------------------------------------- hrseg (one process)
def _hlo_tables(text: str):
    """(instruction name -> (op_name, stack frame id, called computation)), computations'
    instruction names, and stack frame id -> the function/file names on it (innermost first)."""
    sections, cur = collections.defaultdict(list), None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = line
        elif cur and line[:1].isdigit():
            sections[cur].append(line)
        else:
            cur = None
    files = {int(k): v.strip('"') for k, v in (r.split(" ", 1) for r in sections["FileNames"])}
    funcs = {int(k): v.strip('"') for k, v in (r.split(" ", 1)
                                                for r in sections["FunctionNames"])}
    locs = {int(m[1]): (int(m[2]), int(m[3])) for m in (
        re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", r)
        for r in sections["FileLocations"]) if m}
    frames = {int(m[1]): (int(m[2]), int(m[3])) for m in (
        re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", r)
        for r in sections["StackFrames"]) if m}

    def stack(fid):
        out, seen = [], set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            f, fn = locs.get(loc, (0, 0))
            out.append(f"{os.path.basename(files.get(f, ''))}:{funcs.get(fn, '')}")
            fid = parent
        return out
    inst = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\S+) .*?$", text, re.MULTILINE):
        line = m.group(0)
        op = re.search(r'op_name="([^"]*)"', line)
        sf = re.search(r"stack_frame_id=(\d+)", line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        inst[m.group(1)] = (op.group(1) if op else "", int(sf.group(1)) if sf else 0,
                            m.group(2), target.group(1) if target else "")
    return inst, stack


def conv_kind(op_name: str, shape: str) -> str:
    """The pass of a 3D conv's op: forward, input or weight gradient, or the copies (padding,
    the taps' shifted sums, the weight gradient's windows and lags) around them."""
    last = op_name.rsplit("/", 1)[-1]
    if "transpose(" not in op_name:
        return "conv forward" if last == "conv_general_dilated" else "conv forward: copies"
    if last == "dot_general":
        return "conv weight gradient"
    if last == "conv_general_dilated":   # XLA's backprop-filter conv has the kernel's shape
        return "conv weight gradient" if _kernel_shaped(shape) else "conv input gradient"
    return "conv backward: copies"


def _kernel_shaped(shape: str) -> bool:
    return bool(re.match(r"f32\[(\d+,){4}\d+\]", shape)) and shape.startswith(
        ("f32[3,3,3", "f32[1,3,3", "f32[3,3,1"))


def kind_of(op_name: str, stack: list[str], shape: str = "", target: str = "") -> str:
    """A thunk's kind from its stack (innermost first), op_name, shape and custom-call target."""
    frame = stack[0] if stack else ""
    if target.startswith("hrseg_conv3d"):   # the C++ direct conv (its backward's stack is the
        if target == "hrseg_conv3d_weight_grad":   # custom VJP's call site)
            return "conv weight gradient"
        return "conv input gradient" if "transpose(" in op_name else "conv forward"
    if "native.py" in frame:             # the casts around the direct conv's custom calls
        if _kernel_shaped(shape):
            return "conv weight gradient"
        return "conv input gradient" if "transpose(" in op_name else "conv forward"
    if "cpuconv.py" in frame or frame.endswith("halo.py:conv") or "exchange.py" in frame:
        return conv_kind(op_name, shape)
    for key, kind in FRAME_KINDS:
        if key in frame:
            bwd = "transpose(" in op_name and kind not in ("optimizer", "loss")
            return kind + (" (backward)" if bwd else "")
    return "other"


def hrseg_profile(size: int, steps: int, preset: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_xprof_traceme=true"
                                   f" --xla_dump_to={tmp}/hlo --xla_dump_hlo_as_text"
                                   " --xla_dump_hlo_module_re=.*train_step.*").strip()
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)   # compiled here: dumped
        from hrseg import runtime
        runtime.start(runtime.RuntimeConfig(compile_cache=""))
        import jax
        import speed
        jax.config.update("jax_enable_compilation_cache", False)
        step, _ = speed._jax_worker("hrseg", size, preset)
        wall = warm_and_time(step, steps)
        with jax.profiler.trace(f"{tmp}/trace"):
            for _ in range(steps):
                step()
        hlo = sorted(glob.glob(f"{tmp}/hlo/*train_step*after_optimizations.txt"))
        if not hlo:
            raise RuntimeError("no compiled train_step module was dumped")
        with open(hlo[-1]) as f:
            inst, stack = _hlo_tables(f.read())
        (trace,) = glob.glob(f"{tmp}/trace/**/*.trace.json.gz", recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    kinds, top = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in inst:
            op, fid, shape, target = inst[e["name"]]
            k = kind_of(op, stack(fid), shape, target)
            kinds[k] += e["dur"] / 1e3 / steps
            top[(k, e["name"])] += e["dur"] / 1e3 / steps
    return {"wall_s": statistics.median(wall), "ms_per_step": dict(kinds.most_common()),
            "top_thunks": [{"kind": k, "thunk": n, "ms": v} for (k, n), v in top.most_common(20)]}


def cold_start(size: int, preset: str) -> dict:
    """Where a fresh process's first hrseg step goes (no compilation cache, no step cache):
    imports and model set-up, then ``jax.jit``'s trace, lower and compile of the training
    step (speed.py's, the state donated), its first execution and a second one."""
    t0 = time.perf_counter()
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)   # cold: nothing cached
    from hrseg import runtime
    runtime.start(runtime.RuntimeConfig(compile_cache=""))
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_compilation_cache", False)
    import numpy as np
    import optax

    from hrseg.nn import losses, unet
    from hrseg.parallel import partition
    from hrseg.train import step as hstep
    cfg = unet.preset(preset)
    layout = partition.layout(partition.make_mesh((1, 1, 1), 1, devices=jax.devices()[:1]),
                              "none")
    opt = optax.adam(1e-4)
    graphdef, state = hstep.init_state(unet.build(cfg), opt)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, size, size, size, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, cfg.classes, (1, size, size, size)).astype(np.int32))
    loss_fn = lambda logits, labels: losses.weighted_ce(logits, labels, (1.0,) * 3)
    fn = hstep.make_train_step(graphdef, opt, loss_fn, layout)
    jax.block_until_ready(state)
    out = {"setup_s": time.perf_counter() - t0}
    t = time.perf_counter()
    traced = fn.trace(state, x, y)
    out["trace_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lowered = traced.lower()
    out["lower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t
    for k in ("first_run_s", "second_run_s"):
        t = time.perf_counter()
        state, m = compiled(state, x, y)
        jax.block_until_ready(m["loss"])
        out[k] = time.perf_counter() - t
    return out


# ---------------------------------------------------------------- PyTorch (one process)
def torch_profile(size: int, steps: int, arch: str, channels_last: bool) -> dict:
    import torch_baseline
    from torch.profiler import ProfilerActivity, profile
    step, _ = torch_baseline.worker(size, 0, arch, channels_last)
    wall = warm_and_time(step, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    kinds = collections.Counter()
    ops = {}
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / steps
        kind = next((k for frag, k in TORCH_KINDS if frag in e.key), "other")
        kinds[kind] += ms
        ops[e.key] = ms
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    return {"wall_s": statistics.median(wall), "channels_last": channels_last,
            "ms_per_step": dict(kinds.most_common()),
            "top_ops": [{"op": k, "ms": v} for k, v in top]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    ap.add_argument("--size", type=int, default=64, help="cube size S of the 1×S³×1 volume")
    ap.add_argument("--preset", default="mtf", help="hrseg.nn.unet preset (speed.py's)")
    ap.add_argument("--steps", type=int, default=3, help="profiled (and timed) steps")
    ap.add_argument("--make-torch-venv", metavar="DIR",
                    help="a venv with PyTorch (speed.py's --make-torch-venv); without it, "
                         "hrseg only")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--worker", choices=("hrseg", "hrseg_cold", "torch", "torch_cl"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker == "hrseg":
            r = hrseg_profile(args.size, args.steps, args.preset)
        elif args.worker == "hrseg_cold":
            r = cold_start(args.size, args.preset)
        else:
            r = torch_profile(args.size, args.steps, args.arch, args.worker == "torch_cl")
        print(json.dumps(r))
        return 0
    import record
    import speed
    import torch_baseline

    from hrseg.nn import unet
    cfg = unet.preset(args.preset)
    args.arch = f"{cfg.levels},{cfg.base},{cfg.convs_per_block},{cfg.classes}"
    workers = {"hrseg": sys.executable, "hrseg_cold": sys.executable}
    if args.make_torch_venv:
        py = str(torch_baseline.make_venv(args.make_torch_venv))
        workers.update(torch=py, torch_cl=py)
    out = {**record.header(), "size": args.size,
           "preset": args.preset, "steps": args.steps, "malloc": "tuned"}
    for name, py in workers.items():   # one after another: nothing else runs beside a profile
        env = speed.malloc_env(os.environ, "tuned")
        env.setdefault("JAX_PLATFORMS", "cpu")
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE)]
                                            + [p for p in env.get("PYTHONPATH", "").split(
                                                os.pathsep) if p])
        proc = subprocess.run([py, os.path.abspath(__file__), "--worker", name, "--size",
                               str(args.size), "--steps", str(args.steps), "--preset",
                               args.preset, "--arch", args.arch],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            sys.exit(f"step_profile.py: error: the {name} worker failed:\n{proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    record.emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
