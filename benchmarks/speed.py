"""CPU training-step and inference speed: hrseg vs the same U-Net in stock Flax and PyTorch.

    python benchmarks/speed.py --json                        # 64³, 6 rounds (minutes)
    python benchmarks/speed.py --json --size 16 --rounds 1 --no-torch     # a smoke run
    python benchmarks/speed.py --json --make-torch-venv .cache/torch-venv --rounds 4 \
        --out benchmarks/results/speed_$(date +%F).json

Network: ``unet.preset("mtf")`` (3³ convs without bias, BatchNorm, LeakyReLU 0.1, max-pool,
k2s2 transposed conv, 1³ head), one ``1×S³×1`` volume, 3 classes, fp32, mean cross-entropy,
Adam. Each framework runs in its own worker process; the workers are asked in turn (one
computes while the others wait), ``--rounds`` times, so a shared machine's load hits them
alike. Per round and framework: one training step and one whole-volume inference (eval mode,
argmax). Reported: medians, voxels/s, and the median of the per-round ratios (paired, which
cancels most of the load drift). ``first_step_s``: the first training step (trace + compile
+ run) in a process whose persistent compilation cache is empty (cold) and in a second
process that finds it filled (warm); ``*_overhead_s`` subtracts the median step.

PyTorch (never a dependency) runs from a venv the benchmark creates with ``--make-torch-venv``
(``pip install torch==2.13.0+cpu``, benchmarks/torch_baseline.py) or wherever ``torch`` imports
in ``--torch-python``; ``--threads`` sets its intra-op threads (default: PyTorch's own). It runs
in both memory formats its CPU docs offer (``torch``: contiguous NCDHW, ``torch_cl``:
``channels_last_3d``; ``--torch-format``), each its own worker, and hrseg is compared with the
faster (``torch_best``). Every worker — hrseg, stock Flax (its step jitted with buffer donation,
as hrseg's), PyTorch — runs under the same glibc allocator settings: ``--malloc tuned``
(hostmem.py's), ``default`` (glibc's) or ``both`` (the default: one run each, under
``by_malloc``). ``peak_rss_bytes``: each worker's peak resident memory over the timed rounds
(``VmHWM``, restarted after the first step, so the compiler's peak is not in it;
``first_peak_rss_bytes`` is the peak up to then). The JSON records the date, machine (CPU model
and vector ISA), command, each worker's environment, versions and PyTorch's build
(``torch.__config__.show()``), and warns when PyTorch's step is over 1.5× the one in the newest
committed ``benchmarks/results/speed_*.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from hrseg.runtime import hostmem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record
import torch_baseline
from torch_baseline import TORCH_PIN

HERE = os.path.dirname(os.path.abspath(__file__))
FRAMEWORKS = ("hrseg", "flax", "torch", "torch_cl", "hrseg_xla", "hrseg_wide")
# PyTorch's memory formats: torch = contiguous (NCDHW), torch_cl = channels_last_3d (NDHWC)
TORCH_FORMATS = {"contiguous": ("torch",), "channels_last": ("torch_cl",),
                 "both": ("torch", "torch_cl")}
TORCH_NAMES = {"torch": "torch_contiguous", "torch_cl": "torch_channels_last"}


# ---------------------------------------------------------------- workers (one per process)
def _jax_worker(name: str, size: int, preset: str):
    """(step(), infer()) closures for hrseg or stock Flax; each blocks until done."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from hrseg.nn import losses, unet
    from hrseg.parallel import partition
    from hrseg.train import step as hstep
    from hrseg.train import stepcache

    cfg = unet.preset(preset)
    # hrseg_xla: XLA's own 3D conv (model.conv: xla); hrseg_wide: the wide-image formulation
    # without the C++ direct conv (HRSEG_NATIVE=0 in its environment)
    if name.startswith("hrseg"):
        cfg = dataclasses.replace(cfg, conv="xla" if name == "hrseg_xla" else "auto")
        name = "hrseg"
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, size, size, size, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, cfg.classes, (1, size, size, size)).astype(np.int32))
    opt = optax.adam(1e-4)
    if name == "hrseg":
        layout = partition.layout(partition.make_mesh((1, 1, 1), 1, devices=jax.devices()[:1]),
                                  "none")
        graphdef, state = hstep.init_state(unet.build(cfg), opt)
        loss_fn = lambda logits, labels: losses.weighted_ce(logits, labels, (1.0,) * 3)
        # as `hrseg train`: through the step cache (active when --cache-dir is given)
        train = stepcache.wrap(hstep.make_train_step(graphdef, opt, loss_fn, layout, jit=False),
                               {"benchmark": "speed", "preset": preset, "optimizer": "adam"})
        predict = hstep.make_predict(graphdef, layout)
        box = [state]

        def step():
            box[0], m = train(box[0], x, y)
            jax.block_until_ready(m["loss"])

        def infer():
            jax.block_until_ready(predict(box[0].params, box[0].rest, x)[0])
        return step, infer

    sys.path.insert(0, HERE)
    from memory import _plain_flax_unet  # the stock-Flax U-Net of the memory benchmark
    graphdef, params, rest = nnx.split(_plain_flax_unet(cfg), nnx.Param, ...)

    def loss(params, rest):
        params, rest = jax.tree.map(lambda v: v, (params, rest))  # (as hrseg's step._merge)
        model = nnx.merge(graphdef, params, rest)
        logits = model(x, train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce, nnx.state(model, nnx.Not(nnx.Param))

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))   # as hrseg's step: donated
    def train(params, rest, opt_state):
        (l, rest), g = jax.value_and_grad(loss, has_aux=True)(params, rest)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, l

    @jax.jit
    def predict(params, rest):
        return jnp.argmax(nnx.merge(graphdef, params, rest)(x, train=False), -1)

    box = [params, rest, opt.init(params)]

    def step():
        box[0], box[1], box[2], l = train(*box)
        jax.block_until_ready(l)

    def infer():
        jax.block_until_ready(predict(box[0], box[1]))
    return step, infer


def rss() -> dict:
    """This process's resident memory now and its peak (``VmHWM``) since the last
    :func:`reset_peak`, in bytes (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            rows = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(rows[v].split()[0]) * 1024 for k, v in
                (("rss_bytes", "VmRSS"), ("peak_bytes", "VmHWM"))}
    except (OSError, KeyError, ValueError):
        return {}


def reset_peak() -> None:
    """Restart the peak-RSS count (``echo 5 > /proc/self/clear_refs``): the steady steps' peak,
    not the compiler's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(args) -> int:
    """Build, time the first step, then answer "step"/"infer"/"mem"/"quit" lines on stdin;
    "mem": the peak RSS over the steps since the first one (:func:`rss`)."""
    t0 = time.perf_counter()
    if args.worker.startswith("torch"):
        step, infer = torch_baseline.worker(args.size, args.threads, args.arch,
                                            args.worker == "torch_cl")
        about = torch_baseline.info()
    else:
        if args.worker.startswith("hrseg"):   # as the `hrseg` command starts its process
            from hrseg import runtime
            runtime.start(runtime.RuntimeConfig(compile_cache=args.cache_dir or ""))
        if args.cache_dir:
            import jax
            jax.config.update("jax_compilation_cache_dir", args.cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        step, infer = _jax_worker(args.worker, args.size, args.preset)
        import jax
        about = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
        if args.worker.startswith("hrseg"):
            from hrseg.parallel import native
            about["native_conv"] = native.status()
    about["environment"] = environment(os.environ)
    setup = time.perf_counter() - t0
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    t = time.perf_counter()
    infer()
    first_infer = time.perf_counter() - t
    cold = rss()                      # the peak so far: setup, compiles and the first step
    reset_peak()
    print(json.dumps({"setup_s": setup, "first_step_s": first, "first_infer_s": first_infer,
                      "first_peak_rss_bytes": cold.get("peak_bytes"), "info": about}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "mem":
            print(json.dumps({"mem": rss()}), flush=True)
            continue
        t = time.perf_counter()
        (step if cmd == "step" else infer)()
        print(json.dumps({cmd: time.perf_counter() - t}), flush=True)
    return 0


# ---------------------------------------------------------------- the driver
class Worker:
    def __init__(self, name: str, args, malloc: str, cache_dir: str | None = None):
        torch = name.startswith("torch")
        py = args.torch_python if torch else sys.executable
        cmd = [py, os.path.abspath(__file__), "--worker", name, "--size", str(args.size),
               "--threads", str(args.threads), "--preset", args.preset, "--arch", args.arch]
        if cache_dir:
            cmd += ["--cache-dir", cache_dir]
        env = malloc_env(os.environ, malloc)   # one allocator setting for every worker
        env.setdefault("JAX_PLATFORMS", "cpu")
        if name == "hrseg_wide":
            env["HRSEG_NATIVE"] = "0"
        extra = [args.torch_path] if torch and args.torch_path else []
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(HERE)] + extra + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.first = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, cmd: str):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()[cmd]

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


def malloc_env(base, malloc: str) -> dict:
    """``base`` with glibc's allocator set alike for every framework: ``tuned`` = hostmem.py's
    settings (one arena, no mmap, no trim: what `hrseg` runs with), ``default`` = glibc's own."""
    env = dict(base)
    for k in hostmem.CHILD_ENV:
        env.pop(k, None)
    if malloc == "tuned":
        env.update(hostmem.CHILD_ENV)
        env["HRSEG_HOST_MALLOC"] = "on"
    else:
        env["HRSEG_HOST_MALLOC"] = "off"
    return env


def environment(env) -> dict:
    """The variables of a worker's environment that change its speed, as recorded."""
    keys = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
            "HRSEG_HOST_MALLOC", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS",
            "JAX_PLATFORMS", "LD_PRELOAD", "HRSEG_NATIVE")
    return {k: env[k] for k in keys if k in env} | {"cpus": len(os.sched_getaffinity(0))}


def measure(args, malloc: str = "tuned") -> dict:
    names = (["hrseg", "flax"] + (list(TORCH_FORMATS[args.torch_format]) if args.torch else [])
             + (["hrseg_xla"] if args.generic else []) + (["hrseg_wide"] if args.wide else []))
    voxels = args.size ** 3
    with tempfile.TemporaryDirectory() as cache:
        workers = {}
        for n in names:  # started one after another: compiles do not overlap
            workers[n] = Worker(n, args, malloc,
                                cache_dir=None if n.startswith("torch") else os.path.join(cache, n))
        times = {n: {"step": [], "infer": []} for n in names}
        try:
            for _ in range(args.rounds):
                for n in names:
                    for kind in ("step", "infer"):
                        times[n][kind].append(workers[n].ask(kind))
            mem = {n: workers[n].ask("mem") for n in names}
        finally:
            for w in workers.values():
                w.close()
        warm = {}
        for n in ("hrseg", "flax"):  # a second process on the filled cache
            w = Worker(n, args, malloc, cache_dir=os.path.join(cache, n))
            warm[n] = w.first
            w.close()
    out = {"preset": args.preset, "size": args.size, "rounds": args.rounds, "malloc": malloc,
           "frameworks": names, "threads_torch": args.threads,
           "torch_format": args.torch_format,
           "workers": {n: workers[n].first["info"] for n in names}}
    for n in names:
        med = {k: statistics.median(v) for k, v in times[n].items()}
        out[n] = {"step_s": med["step"], "infer_s": med["infer"],
                  "step_voxels_per_s": voxels / med["step"],
                  "infer_voxels_per_s": voxels / med["infer"],
                  "steps": times[n]["step"], "infers": times[n]["infer"],
                  "first_step_cold_s": workers[n].first["first_step_s"],
                  "setup_s": workers[n].first["setup_s"],
                  "first_step_cold_overhead_s": workers[n].first["first_step_s"] - med["step"],
                  # peak RSS over the timed rounds (steps and inferences), and up to them
                  "peak_rss_bytes": mem[n].get("peak_bytes"),
                  "first_peak_rss_bytes": workers[n].first.get("first_peak_rss_bytes")}
        if n in warm:
            out[n]["first_step_warm_s"] = warm[n]["first_step_s"]
            out[n]["first_step_warm_overhead_s"] = warm[n]["first_step_s"] - med["step"]

    def paired(a, b, kind):
        return statistics.median(x / y for x, y in zip(times[a][kind], times[b][kind]))

    summary = {"hrseg_over_flax": paired("hrseg", "flax", "step"),
               "hrseg_over_flax_infer": paired("hrseg", "flax", "infer")}
    if args.generic:
        summary["hrseg_over_hrseg_xla"] = paired("hrseg", "hrseg_xla", "step")
        summary["hrseg_over_hrseg_xla_infer"] = paired("hrseg", "hrseg_xla", "infer")
    if args.wide:
        summary["hrseg_over_hrseg_wide"] = paired("hrseg", "hrseg_wide", "step")
        summary["hrseg_over_hrseg_wide_infer"] = paired("hrseg", "hrseg_wide", "infer")
    torches = [n for n in names if n.startswith("torch")]
    if torches:   # against PyTorch in its faster memory format (per step / per inference)
        best = {k: min(torches, key=lambda n: out[n][f"{k}_s"]) for k in ("step", "infer")}
        out["torch_best"] = best
        summary["hrseg_over_torch"] = paired("hrseg", best["step"], "step")
        summary["hrseg_over_torch_infer"] = paired("hrseg", best["infer"], "infer")
        for n in torches:   # each format apart (hrseg_over_torch is against the faster)
            summary[f"hrseg_over_{TORCH_NAMES[n]}"] = paired("hrseg", n, "step")
        rss = out["hrseg"]["peak_rss_bytes"], out[best["step"]]["peak_rss_bytes"]
        if all(rss):   # the steady peak of each worker, against the faster PyTorch step's
            summary["hrseg_over_torch_peak_rss"] = rss[0] / rss[1]
    for n in names:
        summary[f"{n}_voxels_per_s"] = out[n]["step_voxels_per_s"]
    for n in ("hrseg", "flax"):
        summary[f"{n}_first_step_cold_s"] = out[n]["first_step_cold_s"]
        summary[f"{n}_first_step_warm_s"] = out[n]["first_step_warm_s"]
        summary[f"{n}_first_step_warm_overhead_s"] = out[n]["first_step_warm_overhead_s"]
    return {**{k: round(v, 4) for k, v in summary.items()}, **out}


RESULTS = os.path.join(HERE, "results")
SLOWER = 1.5   # a PyTorch step this much slower than the last recorded one: a broken baseline


def recorded_torch_step(size: int, preset: str) -> tuple[float, str] | None:
    """The PyTorch step (median) of the newest committed speed JSON at this size and preset."""
    for path in sorted(glob.glob(os.path.join(RESULTS, "speed_*.json")), reverse=True):
        try:
            with open(path) as f:
                d = json.load(f)
            run = d["by_malloc"]["tuned"]
            if (run["size"], run["preset"]) == (size, preset) and "torch_best" in run:
                return run[run["torch_best"]["step"]]["step_s"], path
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    ap.add_argument("--size", type=int, default=64, help="cube size S of the 1×S³×1 volume "
                                                         "(a multiple of 8)")
    ap.add_argument("--preset", default="mtf", help="hrseg.nn.unet preset (plain blocks, "
                                                    "batch norm: mtf or tiny)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    ap.add_argument("--malloc", choices=("tuned", "default", "both"), default="both",
                    help="glibc allocator settings, the same for every framework's worker: "
                         "tuned (hostmem.py's), default (glibc's), or both one after the other")
    ap.add_argument("--threads", type=int, default=0,
                    help="PyTorch intra-op threads (0: PyTorch's own default, one per core)")
    ap.add_argument("--torch-format", choices=tuple(TORCH_FORMATS), default="both",
                    help="PyTorch's memory format: contiguous (NCDHW), channels_last "
                         "(channels_last_3d) or both, each its own worker; hrseg is compared "
                         "with the faster")
    ap.add_argument("--make-torch-venv", metavar="DIR",
                    help=f"create DIR as a venv with `pip install {TORCH_PIN}` (kept if it "
                         "has torch) and run PyTorch from it")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="interpreter whose `import torch` works (default: this one)")
    ap.add_argument("--torch-path", help="a folder with torch installed in it (pip --target), "
                                         "added to the PyTorch worker's PYTHONPATH only")
    ap.add_argument("--no-torch", dest="torch", action="store_false",
                    help="leave PyTorch out even if it imports")
    ap.add_argument("--generic", action="store_true",
                    help="also run hrseg with XLA's own 3D conv (model.conv: xla): before/after")
    ap.add_argument("--wide", action="store_true",
                    help="also run hrseg without the C++ direct conv (HRSEG_NATIVE=0: the "
                         "wide-image formulation): before/after")
    ap.add_argument("--out", help="also write the JSON to this file (e.g. "
                                  "benchmarks/results/speed_<date>.json)")
    ap.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from hrseg.nn import unet
    cfg = unet.preset(args.preset)
    if cfg.block != "plain" or cfg.norm != "batch" or cfg.dims != 3:
        ap.error(f"--preset {args.preset}: the Flax and PyTorch copies are plain-block, "
                 f"batch-norm 3D U-Nets")
    m = 2 ** unet.poolings_of(cfg)
    if args.size % m or args.size < m or args.rounds < 1:
        ap.error(f"--size must be a positive multiple of {m} and --rounds >= 1, "
                 f"got {args.size}, {args.rounds}")
    args.arch = f"{cfg.levels},{cfg.base},{cfg.convs_per_block},{cfg.classes}"
    if args.make_torch_venv and args.torch:
        args.torch_python = str(torch_baseline.make_venv(args.make_torch_venv))
    args.torch = args.torch and torch_baseline.has_torch(args.torch_python, args.torch_path)
    out = {**record.header(),
           "torch_python": args.torch_python if args.torch else None, "by_malloc": {}}
    for malloc in (("tuned", "default") if args.malloc == "both" else (args.malloc,)):
        out["by_malloc"][malloc] = measure(args, malloc)
    first = next(iter(out["by_malloc"].values()))
    out.update({k: v for k, v in first.items() if not isinstance(v, dict)})
    rec = recorded_torch_step(args.size, args.preset) if args.torch else None
    tuned = out["by_malloc"].get("tuned", {})
    if rec and "torch_best" in tuned:
        now = tuned[tuned["torch_best"]["step"]]["step_s"]
        out["torch_step_vs_recorded"] = {"recorded_s": rec[0], "file": os.path.relpath(rec[1]),
                                         "now_s": now, "ratio": now / rec[0]}
        if now > SLOWER * rec[0]:
            print(f"speed.py: warning: PyTorch's step {now:.2f} s is {now / rec[0]:.1f}x the "
                  f"{rec[0]:.2f} s recorded in {os.path.relpath(rec[1])}: check the baseline's "
                  f"install and environment", file=sys.stderr)
    record.emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
