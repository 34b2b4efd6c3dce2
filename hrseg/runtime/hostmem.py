"""Host memory for XLA:CPU: keep each step's scratch buffer in the process (issue 16).

XLA:CPU gives every execution one temporary buffer (1.28 GB for the 64³ ``mtf`` training
step), allocated on a worker thread and freed when the step ends. glibc serves an allocation
that large from a fresh ``mmap`` and gives it back with ``munmap``, so every step faults in
1.28 GB of new zeroed pages: ~320 k page faults, ~1.8 s of kernel CPU per 64³ step on this
2-core machine (``strace``/``getrusage``, see the README). :func:`configure` asks glibc
(``mallopt``) to serve every thread from its main heap, never by ``mmap``, and not to trim the
heap, so the next step reuses the freed buffer with no page faults (0 faults, 0.03 s kernel
CPU per step after the first).

The cost: the process keeps its peak heap until it exits (the pages were resident at the
step's peak anyway) and threads share one malloc arena. The compiler's heap is not kept: after
every XLA compile (JAX's ``backend_compile_duration`` event) :func:`trim` hands the free pages
back (``malloc_trim``), which the no-trim setting would otherwise keep for good — the 64³
``mtf`` worker of benchmarks/speed.py held 1.88 GB after its first step and inference, 0.53 GB
after the trim, and 1.69 GB at its steady peak (steps and inferences) against 2.8 GB before.
The trim also runs under glibc's own settings on the CPU (:func:`trims_after_compiles`).
Applied by ``hrseg.runtime.start``
(``runtime.host_malloc``: ``auto`` when JAX will run on the CPU — ``JAX_PLATFORMS`` is ``cpu``,
or no accelerator is usable (runtime/devices.py) —, ``on``, ``off``) on Linux with glibc; the
same settings go into the environment (``MALLOC_ARENA_MAX`` ...) so child processes —
papermill's notebook kernels — start with them. It must run before JAX starts its CPU client's
threads (a thread keeps the arena it started with): the entry points start the runtime before
the first JAX computation; ``hrseg view`` (napari: it trains nothing) does not.
"""
from __future__ import annotations

import ctypes
import os
import sys

from hrseg.runtime import devices

# glibc <malloc.h>: mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# one arena for every thread, no mmap, never trim the heap (-1: man mallopt, M_TRIM_THRESHOLD)
SETTINGS = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
CHILD_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
             "MALLOC_TRIM_THRESHOLD_": str(2**62)}
_applied: list[bool] = []


def cpu_only(environ=None) -> bool:
    """True when JAX will run on the CPU: ``JAX_PLATFORMS`` names cpu first, or no accelerator
    is usable (devices.accelerators: a plugin installed *and* its device present)."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not devices.accelerators(environ)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        glibc = hasattr(libc, "gnu_get_libc_version")          # not musl
        return libc if glibc and hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def configure(mode: str = "auto") -> bool:
    """Apply the settings once per process (see the module; ``mode``: auto, on, off); True if
    they are in force. The first call decides: later calls return its answer."""
    if _applied:
        return _applied[0]
    ok = False
    libc = _libc()
    if libc is not None and (mode == "on" or (mode == "auto" and cpu_only())):
        ok = all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1
                 for k, v in SETTINGS.items())
        if ok:
            for k, v in CHILD_ENV.items():
                os.environ.setdefault(k, v)
    if libc is not None and trims_after_compiles(ok):
        _trim_after_compiles()
    _applied.append(ok)
    return ok


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"   # jax._src.dispatch's


def trims_after_compiles(settings_applied: bool) -> bool:
    """Whether :func:`configure` trims the heap after each compile: with the settings (their
    no-trim rule would keep the compiler's heap for good) and whenever JAX runs on the CPU
    (glibc's own rule trims only the top of the heap, so the freed compiler memory below the
    step's buffers stays resident: 64³ ``mtf`` steady peak RSS 1.98–2.03 GB without, 1.48 GB
    with, benchmarks/speed.py ``--malloc default``); ``off`` changes no malloc setting."""
    return settings_applied or cpu_only()


def trim() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``); True if done."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(ctypes.c_size_t(0)) >= 0)


def _trim_after_compiles() -> None:
    """:func:`trim` after every XLA compile: the compiler's working memory, freed when it ends,
    is otherwise kept by the no-trim setting for the life of the process."""
    import jax.monitoring

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            trim()
    jax.monitoring.register_event_duration_secs_listener(listener)
