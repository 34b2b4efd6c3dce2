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
import stat
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


def check_folder(path: str | Path) -> str | None:
    """Why the cache folder ``path`` must not be used (None: use it), creating it 0700 when
    missing. It holds executables this process will run, so it must be a folder owned by this
    user and writable by nobody else; one that cannot be created or written costs the caller a
    line (run without the cache), never the run."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        return f"{path} exists and is not a folder"
    except OSError as e:
        return f"cannot create {path} ({e.strerror or e})"
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot read {path} ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if st.st_uid != os.getuid():
        return f"{path} is owned by another user (uid {st.st_uid}), not by you"
    if st.st_mode & 0o022:
        return (f"{path} is writable by others (mode {oct(st.st_mode & 0o777)}); "
                f"`chmod go-w {path}` to use it")
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None
