"""hostmem.py: XLA:CPU's per-step scratch is reused, not faulted in again on every step.

Each case runs in its own process: the malloc settings must precede JAX's CPU threads."""
import json
import os
import subprocess
import sys

import pytest

from hrseg.runtime import hostmem

PROBE = r"""
import json, os, resource
from hrseg import runtime
rt = runtime.start()                         # applies hostmem.configure() (or not)
import jax, jax.numpy as jnp, optax
from hrseg.runtime import hostmem
from hrseg.nn import losses, unet
from hrseg.parallel import partition
from hrseg.train import step as hstep
opt = optax.adam(1e-3)
layout = partition.layout(partition.make_mesh((1, 1, 1), 1, devices=jax.devices()[:1]), "none")
graphdef, state = hstep.init_state(unet.build(unet.preset("tiny")), opt)
train = hstep.make_train_step(graphdef, opt, lambda l, t: losses.weighted_ce(l, t, (1.,) * 3),
                              layout)
x, y = jnp.ones((1, 64, 64, 64, 1)), jnp.zeros((1, 64, 64, 64), jnp.int32)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, m = train(state, x, y)
    jax.block_until_ready(m)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": rt.host_malloc, "faults": faults,
                  "env": {k: os.environ.get(k) for k in hostmem.CHILD_ENV}}))
"""


def _probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in hostmem.CHILD_ENV}
    full.pop("HRSEG_HOST_MALLOC", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**full, "JAX_PLATFORMS": "cpu", **env}, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_step_reuses_its_scratch_memory_and_children_inherit_the_setting():
    on, off = _probe(), _probe(HRSEG_HOST_MALLOC="0")
    assert on["applied"] and not off["applied"]
    # the 64³ tiny step's scratch (over glibc's 32 MB mmap ceiling) is faulted in again on
    # every step by glibc's default (mmap/munmap per step); reused from the heap from the
    # third step on (the first ones size it; until the heap settles, a step may still grow it)
    assert min(off["faults"][2:]) > 5000, off
    # (a step of the settling heap may still fault ~one scratch in: seen on steps 2–4, so the
    # typical step is compared, not the sum)
    assert sorted(on["faults"][2:])[2] < min(off["faults"][2:]) / 2, (on, off)
    assert sorted(on["faults"][2:])[2] < 100, on            # half the steps: no new page at all
    assert on["env"] == hostmem.CHILD_ENV and off["env"] == dict.fromkeys(hostmem.CHILD_ENV)


def test_only_where_jax_runs_on_the_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not hostmem.cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem.cpu_only()


TRIM_PROBE = r"""
import json, os
from hrseg import runtime
rt = runtime.start()
import jax, jax.numpy as jnp
from hrseg.runtime import hostmem
calls = []
real = hostmem.trim
hostmem.trim = lambda: calls.append(1) or real()
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
before = len(calls)
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.cos(x).T))
jax.block_until_ready(f(jnp.ones((64, 64))))
print(json.dumps({"applied": rt.host_malloc, "compile_trims": len(calls) - before,
                  "cached_call_trims": (f(jnp.ones((64, 64))), len(calls) - before)[1]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_heap_is_trimmed_after_each_compile_on_the_cpu(monkeypatch):
    full = {k: v for k, v in os.environ.items() if k not in hostmem.CHILD_ENV}
    full.pop("HRSEG_HOST_MALLOC", None)
    out = {}
    for mode in ("on", "0"):
        proc = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True,
                              text=True, timeout=300, check=False,
                              env={**full, "JAX_PLATFORMS": "cpu", "HRSEG_HOST_MALLOC": mode})
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["on"]["applied"] and out["on"]["compile_trims"] >= 1, out   # after a compile
    assert out["on"]["cached_call_trims"] == out["on"]["compile_trims"]     # not per call
    # glibc's own settings (host_malloc off) on the CPU: no mallopt, but the trim still runs
    assert not out["0"]["applied"] and out["0"]["compile_trims"] >= 1, out
    assert out["0"]["cached_call_trims"] == out["0"]["compile_trims"]
    assert hostmem.trim() in (True, False)
    # an accelerator process without the settings: the CPU's heap is not the step's, no trim
    monkeypatch.setattr(hostmem, "cpu_only", lambda environ=None: False)
    assert not hostmem.trims_after_compiles(False) and hostmem.trims_after_compiles(True)
    monkeypatch.setattr(hostmem, "cpu_only", lambda environ=None: True)
    assert hostmem.trims_after_compiles(False)
