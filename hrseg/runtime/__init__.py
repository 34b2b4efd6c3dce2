"""What configures the process, in one place: started by the entry points, never by an import.

    hostmem        glibc malloc settings that keep XLA:CPU's per-step scratch in the heap
    compile_cache  JAX's persistent compilation cache folder (and the step cache inside it)
    devices        the real accelerator, or fake CPU devices where wanted (before jax starts)
    multihost      jax.distributed.initialize from the config

``import hrseg`` changes nothing in the process. The ``hrseg`` command (hrseg/cli.py), the
notebooks' ``pipeline.notebook_setup()`` and the tests' conftest call :func:`start` with the
``runtime`` section of a run config (hrseg.schema.RuntimeConfig); ``hrseg.train.train`` starts
jax.distributed itself when its config asks. Each setting can be overridden by an environment
variable, which wins over the config:

| setting (config key)    | default      | environment override                            |
|-------------------------|--------------|-------------------------------------------------|
| runtime.host_malloc     | auto         | HRSEG_HOST_MALLOC = auto, on/1, off/0           |
| runtime.compile_cache   | .cache/jax   | JAX_COMPILATION_CACHE_DIR = a folder            |
|                         |              | HRSEG_COMPILE_CACHE = 0 (off)                   |
| runtime.step_cache      | true         | HRSEG_STEP_CACHE = 0 (off) / 1                  |
| runtime.distributed ... | false        | JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,     |
|                         |              | JAX_PROCESS_ID fill the fields left empty       |
| fake CPU devices        | none         | XLA_FLAGS; notebook_setup(fake_devices=N)       |
| model.conv (a kernel)   | auto         | (not a process setting: chosen per network)     |

``start`` applies the malloc settings once per process (the first call decides: a thread keeps
the arena it started with, so it must come before JAX's first computation) and exports them,
with the compilation cache's folder, to the environment of child processes (papermill's
notebook kernels), since that is the only way a child inherits them.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hrseg.schema import RuntimeConfig

OVERRIDES = {"host_malloc": "HRSEG_HOST_MALLOC", "step_cache": "HRSEG_STEP_CACHE",
             "compile_cache": "JAX_COMPILATION_CACHE_DIR"}
CACHE_OFF = "HRSEG_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no")


@dataclass(frozen=True)
class Runtime:
    """What :func:`start` put in force."""
    settings: RuntimeConfig             # after the environment's overrides
    host_malloc: bool                   # the malloc settings are in force in this process
    compile_cache: Path | None          # the persistent cache's folder (None: off)
    step_cache: bool                    # the exported step is kept in that folder


_current: list[Runtime] = []


def resolve(cfg: RuntimeConfig | None = None, environ=None) -> RuntimeConfig:
    """``cfg`` (default: the defaults) with the environment's overrides applied."""
    cfg = cfg or RuntimeConfig()
    env = os.environ if environ is None else environ
    changes = {}
    if env.get(OVERRIDES["host_malloc"], "").strip():
        changes["host_malloc"] = env[OVERRIDES["host_malloc"]]
    if env.get(OVERRIDES["step_cache"], "").strip():
        changes["step_cache"] = env[OVERRIDES["step_cache"]].strip().lower() not in _OFF
    if env.get(OVERRIDES["compile_cache"]):
        changes["compile_cache"] = env[OVERRIDES["compile_cache"]]
    if env.get(CACHE_OFF, "").strip().lower() in _OFF:
        changes["compile_cache"] = ""
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as e:
        raise ValueError(f"${OVERRIDES['host_malloc']}: {e}") from None


def start(cfg: RuntimeConfig | None = None, *, root: str | Path | None = None,
          command: str = "hrseg") -> Runtime:
    """Configure this process (and what its children inherit) from ``cfg`` and the environment;
    returns what is in force. ``root``: the folder a relative ``compile_cache`` is under
    (default: the working folder). May be called again, e.g. with a run's own section.

    The compilation cache holds executables this process will run: a folder that is not this
    user's own, is writable by others, or cannot be made (compile_cache.check_folder) costs
    one ``<command>: compilation cache off: ...`` line, and the process runs without it."""
    from hrseg.runtime import hostmem
    cfg = resolve(cfg)
    malloc = hostmem.configure(cfg.host_malloc)
    folder = _compile_cache(cfg.compile_cache, root, command) if cfg.compile_cache else None
    state = Runtime(cfg, malloc, folder, bool(cfg.step_cache and folder is not None))
    _current[:] = [state]
    return state


def _compile_cache(folder: str, root, command: str) -> Path | None:
    from hrseg.runtime import compile_cache
    try:
        why = compile_cache.check_folder(compile_cache.cache_dir(folder, root))
    except OSError as e:            # e.g. the working directory was removed
        why = f"no usable working directory ({e.strerror or e})"
    if why is None:
        return compile_cache.enable(folder, root)
    os.environ.pop(compile_cache.ENV_DIR, None)      # children must not use it either
    if "jax" in sys.modules:                          # (jax read the variable at import)
        sys.modules["jax"].config.update("jax_compilation_cache_dir", None)
    print(f"{command}: compilation cache off: {why}; running without it", file=sys.stderr)
    return None


def current() -> Runtime | None:
    """What the last :func:`start` put in force; None if the process was never started (a
    library user's own script: plain JAX, no caches)."""
    return _current[0] if _current else None
