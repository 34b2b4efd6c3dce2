"""Uneven shards: spatial sizes that pool evenly but do not split evenly over the devices.

A size ``S`` that is a multiple of ``2**poolings`` (the pooling needs that, on one device too)
but not of ``devices × 2**poolings`` (96 slices, 4 poolings, 8 devices: 12 voxels at the
deepest level) is padded at its upper end, inside the partitioned step, to the next multiple
``Sp`` of ``devices × 2**poolings``. Both ``S`` and ``Sp`` halve exactly at every level, so a
2× pooling window never mixes valid and padded voxels. The padding is made invisible:

  * before every convolution (and its halo exchange) the padded voxels are set to zero, which
    is SAME zero padding at the volume's true border (halo.conv);
  * normalization moments count valid voxels only, and their backward pass sends nothing to
    padded ones (halo.moments, nn/norm.py);
  * the labels are padded with ``hrseg.metrics.IGNORE``, which every loss and count leaves out;
  * predictions are cropped back to the unpadded shape (train/step.py).

The valid extent is static (the shapes are known when the step is traced). train/step.py sets
it with :func:`active` while it traces the per-shard network; the ops read it with
:func:`current` and work out their level from their own block size, and each device finds its
block from ``lax.axis_index``. Nothing here runs for shapes that split evenly.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from hrseg.parallel.exchange import axis_size
from hrseg.parallel.partition import SPATIAL


@dataclass(frozen=True)
class Extent:
    """The finest level's spatial sizes: ``valid`` (the volume) and ``padded`` (the step's)."""
    valid: tuple[int, ...]
    padded: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.valid)


def padded_size(size: int, devices: int, poolings: int) -> int:
    """The smallest multiple of ``devices × 2**poolings`` that holds ``size`` voxels."""
    mult = devices * 2 ** poolings
    return -(-int(size) // mult) * mult


def extent(shape: Sequence[int], spatial: Sequence[int], poolings: int) -> Extent | None:
    """The :class:`Extent` of a volume ``(B, *S, C)`` on ``spatial`` = devices along (x, y, z),
    or None when every axis splits evenly (then nothing is padded or masked).

    An axis that does not pool evenly is an error: no mesh can fix that.
    """
    sizes = tuple(int(s) for s in shape[1:-1])
    for d, s in enumerate(sizes):
        if s % 2 ** poolings:
            raise ValueError(f"spatial axis {d + 1} has size {s}, not a multiple of "
                             f"2^{poolings} = {2 ** poolings}: the {poolings} poolings need it "
                             f"(the unpartitioned network could not run it either)")
    padded = tuple(padded_size(s, int(n), poolings) for s, n in zip(sizes, spatial))
    return None if padded == sizes else Extent(sizes, padded)


def pad(x, ext: Extent | None, value=0):
    """``(B, *S, …)`` -> ``(B, *Sp, …)``: ``value`` appended at the upper end of each axis."""
    if ext is None:
        return x
    widths = [(0, 0)] + [(0, p - v) for v, p in zip(ext.valid, ext.padded)]
    widths += [(0, 0)] * (x.ndim - 1 - ext.ndim)
    return jnp.pad(x, widths, constant_values=value)


def crop(x, ext: Extent | None):
    """The inverse of :func:`pad`: ``(B, *Sp, …)`` -> ``(B, *S, …)``."""
    if ext is None:
        return x
    return x[(slice(None),) + tuple(slice(0, v) for v in ext.valid)]


_CURRENT: contextvars.ContextVar[Extent | None] = contextvars.ContextVar("hrseg_uneven",
                                                                         default=None)


@contextlib.contextmanager
def active(ext: Extent | None):
    """Trace the per-shard network inside this block: its ops mask the padding of ``ext``."""
    token = _CURRENT.set(ext)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Extent | None:
    """The extent being traced (None: nothing padded, or not inside a partitioned step)."""
    return _CURRENT.get()


# ``ext`` argument of the ops below: the extent being traced (custom VJP rules, which may be
# traced after the step has left :func:`active`, pass theirs explicitly instead).
CURRENT = "current"


def _resolve(ext):
    return current() if isinstance(ext, str) else ext


def _blocks(x, ext: Extent):
    """Per spatial array axis ``d`` (1-based) whose shard holds padding: ``(d, start, valid)``
    — this shard's first global index (traced) and the level's valid size (static)."""
    out = []
    for d in range(1, ext.ndim + 1):
        b = int(x.shape[d])
        name = SPATIAL[d - 1]
        n = axis_size(name) or 1
        whole = b * n                                   # this level's padded size
        if ext.padded[d - 1] % whole or ext.valid[d - 1] % (ext.padded[d - 1] // whole):
            raise ValueError(f"uneven: block {tuple(x.shape)} axis {d} is not a pooling level "
                             f"of the padded volume {ext.padded} (valid {ext.valid})")
        valid = ext.valid[d - 1] // (ext.padded[d - 1] // whole)
        if valid == whole:
            continue
        start = lax.axis_index(name) * b if n > 1 else 0
        out.append((d, start, valid))
    return out


def valid_mask(x, ext: Extent | None | str = CURRENT):
    """Boolean, broadcastable to ``x (B, *S, …)``: True on valid voxels of this shard; None
    when the shard (at this level) holds no padding or nothing is padded."""
    ext = _resolve(ext)
    if ext is None:
        return None
    mask = None
    for d, start, valid in _blocks(x, ext):
        shape = [1] * x.ndim
        shape[d] = x.shape[d]
        m = (start + lax.broadcasted_iota(jnp.int32, shape, d)) < valid
        mask = m if mask is None else mask & m
    return mask


def zero_padding(x, ext: Extent | None | str = CURRENT):
    """``x`` with its padded voxels set to zero (``x`` itself when it holds none)."""
    mask = valid_mask(x, ext)
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def valid_count(x, axes: Sequence[int], ext: Extent | None | str = CURRENT):
    """Valid elements of this shard over array ``axes`` of ``x``, float32 (to be psum'd)."""
    ext = _resolve(ext)
    sizes = {a: jnp.float32(x.shape[a]) for a in axes}
    for d, start, valid in _blocks(x, ext) if ext is not None else ():
        if d in sizes:
            sizes[d] = jnp.clip(valid - start, 0, x.shape[d]).astype(jnp.float32)
    return math.prod(sizes.values(), start=jnp.float32(1))
