"""Smooth random fields: cubic B-splines through random lattice values — the one owner.

A few small matrix products instead of a 3D Gaussian filter, exact at any voxel size:

* :class:`Field` — NumPy, over a box in millimetres, evaluated block by block (the phantom's
  organ deformation, bowel and texture, hrseg.data.anatomy);
* :func:`smooth_field` — JAX, on a voxel grid, from uniform draws (tumour blobs of
  hrseg.data.augment, inside jit).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = np.float32
OCTAVES = ((8, 1.0), (16, 0.5))   # (cells per axis, amplitude) of the blob field


def bspline_weights(t, n: int) -> np.ndarray:
    """``(len(t), n)`` float32 matrix: cubic B-spline weights of lattice nodes ``0…n-1`` at
    lattice coordinates ``t`` (clamped to ``[1, n-2)`` so the 4 nodes exist). Smooth (C²)
    interpolation of random node values is a cheap smooth random field."""
    t = np.clip(np.asarray(t, np.float64), 1.0, n - 2.0 - 1e-6)
    i = np.floor(t).astype(int)
    f = t - i
    w = np.zeros((len(t), n), np.float32)
    rows = np.arange(len(t))
    w[rows, i - 1] = (1 - f) ** 3 / 6
    w[rows, i] = (3 * f ** 3 - 6 * f ** 2 + 4) / 6
    w[rows, i + 1] = (-3 * f ** 3 + 3 * f ** 2 + 3 * f + 1) / 6
    w[rows, i + 2] = f ** 3 / 6
    return w


class Field:
    """Smooth random field over a box: a cubic B-spline through iid normal lattice values.

    Standard deviation ~1; correlation length ~``cell`` mm. Evaluating it on a block is three
    small matrix products (the spline is separable), exact at any voxel size.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, cell: float):
        self.cell = float(cell)
        self.origin = np.asarray(lo, np.float64) - 2 * self.cell
        n = np.ceil((np.asarray(hi, np.float64) - self.origin) / self.cell).astype(int) + 3
        # B-spline smoothing of iid values leaves ~0.48 of the variance per axis: rescale to 1.
        self.coef = (rng.standard_normal(tuple(n)) / 0.48 ** 1.5).astype(F32)
        self._yz: dict = {}

    def _weights(self, coords, axis: int) -> np.ndarray:
        t = (np.asarray(coords, np.float64) - self.origin[axis]) / self.cell
        return bspline_weights(t, self.coef.shape[axis])

    def __call__(self, xs, ys, zs) -> np.ndarray:
        # The (y, z) part is shared by every slab of a volume: computed once per grid.
        # einsum without optimize stays off BLAS, whose threads thrash on busy small machines.
        key = (np.asarray(ys, F32).tobytes(), np.asarray(zs, F32).tobytes())
        u = self._yz.get(key)
        if u is None:
            v = np.einsum("abc,zc->abz", self.coef, self._weights(zs, 2))
            u = np.einsum("yb,abz->ayz", self._weights(ys, 1), v)
            if len(self._yz) >= 8:
                self._yz.clear()
            self._yz[key] = u
        wx = self._weights(xs, 0)
        used = np.nonzero(wx.any(axis=0))[0]      # the few lattice planes under this block
        s = slice(used[0], used[-1] + 1)
        return np.einsum("xa,ayz->xyz", wx[:, s], u[s])


def smooth_field(u: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Random field, smooth over ~1/8 of each axis with finer detail: cubic B-splines through
    coarse uniform noise ``u`` (flat, field_nodes(ndim) values in [0, 1)). The spline weights
    are constants of the static shape, so this is a few small matmuls."""
    out = jnp.zeros(shape, jnp.float32)
    start = 0
    for cells, amp in OCTAVES:
        size = (cells + 3) ** len(shape)
        field = 2 * u[start:start + size].reshape((cells + 3,) * len(shape)) - 1
        start += size
        for ax, n in enumerate(shape):
            w = bspline_weights((np.arange(n) + 0.5) * cells / n + 1, cells + 3)
            field = jnp.moveaxis(jnp.tensordot(jnp.asarray(w), field, axes=(1, ax)), 0, ax)
        out = out + amp * field
    return out


def field_nodes(ndim: int) -> int:
    return sum((cells + 3) ** ndim for cells, _ in OCTAVES)
