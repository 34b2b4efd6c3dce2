"""hrseg.runtime: importing hrseg changes nothing; start() configures the process from the
``runtime`` config section, with environment variables as overrides."""
import json
import os
import subprocess
import sys

import pytest

from hrseg import config, runtime

PROBE = r"""
import ctypes, json, os, sys
before = dict(os.environ)
import hrseg, hrseg.cli, hrseg.train, hrseg.data, hrseg.memory, hrseg.workbench.pipeline
import hrseg.train.loop, hrseg.atomic
after = dict(os.environ)
# glibc's M_MMAP_MAX is 65536 by default; hostmem sets it to 0: malloc of 64 MiB then stays in
# the heap (the brk end moves) instead of a fresh mmap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.sbrk.restype = ctypes.c_void_p
top = libc.sbrk(0)
p = libc.malloc(64 << 20)
grew = libc.sbrk(0) - top
libc.free(ctypes.c_void_p(p))
print(json.dumps({"changed": sorted(k for k in set(before) | set(after)
                                    if before.get(k) != after.get(k)),
                  "heap_grew": grew, "started": hrseg.runtime.current() is not None}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_hrseg_changes_no_environment_variable_and_no_malloc_setting():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**env, "JAX_PLATFORMS": "cpu"}, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["changed"] == [] and not out["started"], out
    assert out["heap_grew"] < 1 << 20, out   # 64 MiB came from mmap: glibc's default in force


def test_the_environment_overrides_the_config_section():
    cfg = config.RuntimeConfig(host_malloc="auto", compile_cache=".cache/jax", step_cache=True)
    assert runtime.resolve(cfg, {}) == cfg
    r = runtime.resolve(cfg, {"HRSEG_HOST_MALLOC": "0", "HRSEG_STEP_CACHE": "0",
                              "JAX_COMPILATION_CACHE_DIR": "/tmp/c"})
    assert (r.host_malloc, r.step_cache, r.compile_cache) == ("off", False, "/tmp/c")
    assert runtime.resolve(cfg, {"HRSEG_COMPILE_CACHE": "0"}).compile_cache == ""
    with pytest.raises(ValueError, match="runtime.host_malloc.*'sometimes'"):
        runtime.resolve(cfg, {"HRSEG_HOST_MALLOC": "sometimes"})


def test_a_run_config_carries_a_runtime_section(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("runtime:\n  compile_cache: ''\n  step_cache: false\n")
    cfg = config.load(f, ["runtime.host_malloc=off"])
    assert cfg.runtime == config.RuntimeConfig(host_malloc="off", compile_cache="",
                                               step_cache=False)


def test_start_without_a_cache_turns_the_step_cache_off(monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = runtime.current()
    try:
        rt = runtime.start(config.RuntimeConfig(compile_cache="", step_cache=True))
        assert rt.compile_cache is None and not rt.step_cache and runtime.current() is rt
    finally:
        runtime._current[:] = [before] if before else []


def test_the_key_roles_are_derived_from_the_schema():
    from hrseg.train import rundir, stepcache
    from hrseg.workbench import results
    assert "train.steps" in rundir.MAY_CHANGE and "model.base" not in rundir.MAY_CHANGE
    assert all(k.startswith(("train.", "data.", "augment.", "runtime."))
               for k in config.keys(step=False))
    fp = stepcache.config_fingerprint(config.from_dict({}))
    assert "augment" not in fp and "runtime" not in fp and "seed" not in fp["train"]
    a = config.from_dict({"train": {"seed": 1, "name": "a"}, "mesh": {"spatial": [2, 1, 1]}})
    b = config.from_dict({"train": {"seed": 2, "name": "b"}})
    assert results.recipe(a) == results.recipe(b)
    assert results.recipe(a) != results.recipe(config.from_dict({"train": {"steps": 7}}))
