"""Which devices a process uses: the real accelerator when there is one, fake CPU devices only
where they are wanted.

Fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) let a laptop compile
the meshes of a pod from abstract inputs (notebooks 01 and 02). They are requested only when a
notebook asks for ``N`` devices *and* no accelerator is present, or when forced; on a GPU or TPU
the process keeps its real devices. The flag is read when jax starts its backends, so
:func:`setup` must run before ``import jax`` — this module itself never imports jax.

Accelerators are detected without starting jax (starting it would fix the flags too early): a
jax plugin for the platform is installed *and* the kernel exposes the device (``/dev/nvidia*``
for CUDA, ``/dev/accel*`` or ``/dev/vfio/N`` for TPU). ``JAX_PLATFORMS=cpu`` set by the user
means "no accelerator", whatever is installed.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from dataclasses import dataclass

FLAG = "--xla_force_host_platform_device_count"
# platform -> (jax plugin modules, device nodes)
ASKED = {"gpu": {"gpu", "cuda", "rocm"}, "tpu": {"tpu"}}  # JAX_PLATFORMS names of each
PROBES = {
    "gpu": (("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin"),
            ("/dev/nvidia[0-9]*", "/dev/kfd")),
    "tpu": (("libtpu", "libtpu_nightly"), ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")),
}


def accelerators(environ=None, has_module=None, exists=None) -> list[str]:
    """Accelerator platforms usable by this process (``[]``, ``["gpu"]`` or ``["tpu"]``).

    ``has_module(name)`` and ``exists(pattern)`` default to the real probes; tests pass fakes.
    """
    environ = os.environ if environ is None else environ
    has_module = has_module or (lambda m: importlib.util.find_spec(m) is not None)
    exists = exists or (lambda pattern: bool(glob.glob(pattern)))
    asked = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    found = []
    for platform, (modules, nodes) in PROBES.items():
        if asked and not ASKED[platform] & set(asked):
            continue
        if any(has_module(m) for m in modules) and any(exists(n) for n in nodes):
            found.append(platform)
    return found


@dataclass(frozen=True)
class Choice:
    platform: str       # "cpu" | "gpu" | "tpu": where the notebook's arrays live
    fake_devices: int   # CPU devices requested through XLA_FLAGS (0 = none requested)
    reason: str         # one line for the notebook's output

    def env(self, environ) -> dict[str, str]:
        """The environment variables to set (before jax is imported) for this choice: the
        fake-device flag, or on a GPU an allocator without a preallocated pool (so that
        ``memory_stats()["peak_bytes_in_use"]`` is the program's own peak) unless set."""
        if self.platform == "gpu" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in environ:
            return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        if not self.fake_devices:
            return {}
        flags = re.sub(FLAG + r"=\d+", "", environ.get("XLA_FLAGS", "")).strip()
        return {"XLA_FLAGS": f"{flags} {FLAG}={self.fake_devices}".strip(),
                "JAX_PLATFORMS": "cpu"}  # fake devices exist on the CPU platform only


def choose(fake_devices: int = 0, force_fake: bool = False, found: list[str] | None = None,
           environ=None) -> Choice:
    """Pure decision: fake CPU devices when ``fake_devices > 1`` and (no accelerator was
    ``found`` or ``force_fake``); otherwise the platform that exists."""
    environ = os.environ if environ is None else environ
    found = accelerators(environ) if found is None else list(found)
    if fake_devices < 0:
        raise ValueError(f"fake_devices must be >= 0, got {fake_devices}")
    if found and not force_fake:
        extra = (f"; the {fake_devices} fake CPU devices asked for are not used (meshes "
                 f"larger than the real device count are skipped)") if fake_devices > 1 else ""
        return Choice(found[0], 0, f"using the {found[0].upper()} devices of this machine{extra}")
    if fake_devices > 1:
        why = "forced" if found else "no GPU/TPU found"
        return Choice("cpu", fake_devices, f"{fake_devices} fake CPU devices ({why}): meshes "
                                           f"are compiled, not run, at accelerator scale")
    return Choice("cpu", 0, "using the CPU (no GPU/TPU found)")


def setup(fake_devices: int = 0, force_fake: bool = False, environ=None) -> Choice:
    """:func:`choose`, then set its environment variables; call before ``import jax``.

    Raises if fake devices are needed but jax's backends already started (restart the kernel).
    """
    environ = os.environ if environ is None else environ
    choice = choose(fake_devices, force_fake, environ=environ)
    changes = choice.env(environ)
    if (choice.fake_devices and _backends_started()
            and any(environ.get(k) != v for k, v in changes.items())):
        raise RuntimeError("jax already started its devices in this process, so fake CPU "
                           "devices can no longer be requested: restart the kernel and run "
                           "the set-up cell first")
    environ.update(changes)
    return choice


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # a jax without that module: assume the worst
        return True


def describe(devices) -> str:
    """``"1 gpu device (NVIDIA H200), 139.8 GiB"`` / ``"8 cpu devices"`` for a device list."""
    devices = list(devices)
    if not devices:
        return "no devices"
    d = devices[0]
    kind = getattr(d, "device_kind", "") or ""
    text = (f"{len(devices)} {d.platform} device{'s' if len(devices) > 1 else ''}"
            + (f" ({kind})" if kind and kind.lower() != d.platform else ""))
    limit = (d.memory_stats() or {}).get("bytes_limit") if hasattr(d, "memory_stats") else None
    return text + (f", {limit / 2 ** 30:.1f} GiB each" if limit else "")


def usable_meshes(meshes, n_devices: int) -> list:
    """The meshes (lists of per-axis device counts) that fit on ``n_devices``."""
    out = []
    for m in meshes:
        need = 1
        for k in m:
            need *= int(k)
        if need <= n_devices:
            out.append(m)
    return out
