"""JAX's persistent compilation cache for the workbench (issue 16).

``hrseg train``, ``hrseg run`` and every notebook compile the same training step again; on
CPU that is most of a short run's first step. :func:`enable` (called by
``hrseg.runtime.start`` with ``runtime.compile_cache``) points JAX at a folder under the
project (``.cache/jax``, ignored by git) and lowers the thresholds so CPU executables are
stored, and exports the same settings as environment variables, which JAX reads at import —
so papermill's notebook kernels, children of this process, use the cache too.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
DEFAULT_DIR = Path(".cache") / "jax"
# Executables that compiled faster than this are not worth a disk round trip.
MIN_COMPILE_SECS = 0.3
ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_SECS),
       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def cache_dir(folder: str | Path = DEFAULT_DIR, root: str | Path | None = None) -> Path:
    """``folder`` (``runtime.compile_cache``, overridden by ``$JAX_COMPILATION_CACHE_DIR`` in
    hrseg.runtime.resolve) under ``root`` (default: the working folder) when relative."""
    return (Path(root) if root is not None else Path.cwd()) / Path(folder)


def enable(folder: str | Path = DEFAULT_DIR, root: str | Path | None = None) -> Path:
    """Turn the persistent cache on for this process and its children; returns the folder."""
    import jax
    path = cache_dir(folder, root).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_DIR] = str(path)
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
    return path
