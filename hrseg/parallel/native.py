"""The direct 3D convolution in C++ (``conv3d.cc``), built here and called through ``jax.ffi``.

XLA:CPU has no fast 3D convolution: its own runs at ~25 GFLOP/s here, and the wide-image
formulation of :mod:`hrseg.parallel.cpuconv` computes the padded grid and sums stacked taps
(issue 33's profile: the conv forward 2.2× oneDNN's). ``conv3d.cc`` computes each output once,
in tiles of z positions × output channels held in vector registers, straight from the padded
block (no im2col copy), its rows shared among XLA's intra-op threads: 12 × 32 on a CPU with
AVX-512F, else 6 × 16 with AVX2. Each output sums its terms in the same order in both builds,
so both give the same bits. ``HRSEG_NATIVE_ISA=avx2`` (or ``avx512``) picks one by hand.

The library is compiled on first use with the machine's C++ compiler (``g++ -O3 -mavx2
-mfma [-mavx512f]``, ~4 s) into ``$HRSEG_NATIVE_DIR`` (default ``~/.cache/hrseg/native``),
named by the hash of its source, the flags and jaxlib's version, written to a temporary name
and renamed, so two processes building at once both end with a whole library. It is used only
where it can run: a CPU with AVX2 and FMA, a compiler, ``HRSEG_NATIVE`` not ``0``. Anywhere else
:func:`available` is False and the wide-image formulation runs, with the same results up to
the order of float additions. :func:`status` says which and why (``hrseg doctor``-style
reports, the benchmarks' JSON).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hrseg.parallel.exchange import mesh_order, varying

SOURCE = Path(__file__).with_name("conv3d.cc")
TARGETS = {"hrseg_conv3d": "HrsegConv3d", "hrseg_conv3d_weight_grad": "HrsegConv3dWeightGrad"}
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
ISA_FLAGS = {"avx2": (), "avx512": ("-mavx512f",)}


def isa() -> str:
    """The vector instructions to build for: ``$HRSEG_NATIVE_ISA`` if set, else ``avx512``
    where the CPU lists AVX-512F (Linux's /proc/cpuinfo), else ``avx2``."""
    chosen = os.environ.get("HRSEG_NATIVE_ISA", "")
    if chosen:
        return chosen
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512" if "avx512f" in line.split() else "avx2"
    except OSError:
        pass
    return "avx2"


def flags() -> tuple[str, ...]:
    chosen = isa()
    if chosen not in ISA_FLAGS:
        raise RuntimeError(f"HRSEG_NATIVE_ISA={chosen!r}: expected one of {sorted(ISA_FLAGS)}")
    return FLAGS + ISA_FLAGS[chosen]


def cache_dir() -> Path:
    return Path(os.environ.get("HRSEG_NATIVE_DIR") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hrseg" /
                "native")


def _library_path() -> Path:
    import jaxlib
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags()).encode() +
                         jaxlib.__version__.encode()).hexdigest()[:16]
    return cache_dir() / f"conv3d-{key}.so"


def build() -> Path:
    """The compiled library's path, compiled now if it is not there. Raises ``RuntimeError``
    naming the compiler or the folder when it cannot be built."""
    path = _library_path()                     # (raises RuntimeError for a bad HRSEG_NATIVE_ISA)
    if path.is_file():
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".conv3d-", suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise RuntimeError(f"cannot write to {path.parent}: {e.strerror or e}") from e
    try:
        cmd = [cxx, *flags(), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"{cxx} could not build {SOURCE.name}: {last}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_library() -> ctypes.CDLL:
    """The library, built if needed; a file in the cache that does not load (damaged, cut
    short) is built again and replaced. Raises ``RuntimeError`` or ``OSError``."""
    path = build()
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError:
        path.unlink(missing_ok=True)           # our own cache entry, not a user's file
        return ctypes.cdll.LoadLibrary(str(build()))


@cache
def _load() -> tuple[bool, str]:
    """(usable, why): builds, loads and registers the library once per process."""
    if os.environ.get("HRSEG_NATIVE", "1") == "0":
        return False, "HRSEG_NATIVE=0"
    try:
        lib = load_library()
    except (RuntimeError, OSError) as e:
        return False, str(e)
    if not lib.hrseg_conv3d_supported():
        return False, f"this CPU lacks {'AVX-512F, ' if isa() == 'avx512' else ''}AVX2 or FMA"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return True, f"{lib.hrseg_conv3d_vector_bits()}-bit, built {_library_path()}"


def available() -> bool:
    """Whether :func:`conv3d` runs here (the CPU backend, and the library built and loaded)."""
    return jax.default_backend() == "cpu" and _load()[0]


def status() -> str:
    ok, why = _load()
    return ("native conv3d: " + ("on, " if ok else "off, ") + why)


def conv3d(xp, w, pads=None):
    """VALID stride-1 conv of ``xp (B, X', Y', Z', Cin)`` with ``w (kd, kh, kw, Cin, Cout)``
    -> ``(B, X'-kd+1, Y'-kh+1, Z'-kw+1, Cout)``, float32 sums; 16-bit inputs are widened and
    the result cast back, as XLA:CPU does with its own conv. ``pads``: one ``(lo, hi)`` per
    spatial dim, zeros read around ``xp`` as if it were padded (the kernel skips them; no
    padded copy is made): ``conv3d(x, w, pads) == conv3d(pad(x, pads), w)``."""
    kd, kh, kw, _, cout = w.shape
    pads = tuple(tuple(int(v) for v in p) for p in (pads or ((0, 0),) * 3))
    if len(pads) != 3 or any(v < 0 for p in pads for v in p):
        raise ValueError(f"conv3d: pads {pads} must be three non-negative (lo, hi)")
    B, Xp, Yp, Zp = (xp.shape[0], *(n + lo + hi for n, (lo, hi) in zip(xp.shape[1:4], pads)))
    dtype = jnp.result_type(xp, w)
    out = jax.ShapeDtypeStruct((B, Xp - kd + 1, Yp - kh + 1, Zp - kw + 1, cout), jnp.float32)
    y = jax.ffi.ffi_call("hrseg_conv3d", out)(
        xp.astype(jnp.float32), w.astype(jnp.float32), pad_x=np.int64(pads[0][0]),
        pad_y=np.int64(pads[1][0]), pad_z=np.int64(pads[2][0]))
    return _varying_like(y, xp, w).astype(dtype)


def conv3d_weight_grad(xp, g, kshape):
    """The gradient of :func:`conv3d` with respect to its kernel of shape ``kshape``, given
    the output gradient ``g (B, X, Y, Z, Cout)``: float32 sums, cast to ``xp``'s dtype."""
    out = jax.ShapeDtypeStruct(tuple(kshape), jnp.float32)
    dw = jax.ffi.ffi_call("hrseg_conv3d_weight_grad", out)(xp.astype(jnp.float32),
                                                            g.astype(jnp.float32))
    return _varying_like(dw, xp, g).astype(jnp.result_type(xp, g))


def _varying_like(y, *args):
    """``y`` typed as varying over the mesh axes its inputs vary over (shard_map with
    ``check_vma``): an FFI call's result carries none, and a weight gradient typed invariant
    would not be summed over the shards."""
    axes = frozenset().union(*(varying(a) for a in args)) - varying(y)
    return lax.pcast(y, mesh_order(axes), to="varying") if axes else y
