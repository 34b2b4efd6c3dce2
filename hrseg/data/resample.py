"""Resampling a canonical volume to the network grid, and back.

Every output voxel ``o`` (per axis) samples the input at the continuous voxel coordinate
``c = scale * o + offset`` — one diagonal affine map, stored in each case's meta so that
:func:`to_input_grid` can undo it exactly. Two ways to choose it:

* ``"stretch"`` (the paper): each axis is stretched to the output size, the volume's outer
  faces on the grid's (``scale = n_in / n_out``, ``offset = scale/2 - 1/2``);
* ``"spacing"``: one isotropic spacing for all axes (``spacing_mm``, or 0 = the smallest
  that fits the whole volume), centred; the rest is padded (air, background) or cropped;
* ``"native"`` (Wang et al.'s "256 × 256 × full"): a fixed voxel size per axis
  (``native_mm``, e.g. 1.62 × 1.62 × 3.22 mm); each case keeps its own extent, so its output
  shape is ``round(n_in × spacing / native_mm)`` per axis (≥ 1) and the grid is stretched
  faces-on-faces onto that shape (the realised spacing is within half a voxel of the asked
  one over the whole extent). Nothing is cropped or padded here: buckets.py pads to the mesh.

Images are trilinear (order 1); when an axis shrinks by 2× or more it is first averaged in
blocks of ``floor(scale)`` voxels (anti-aliasing, and far less work at 512×512 → 64²); a
partial block at the end of an axis is dropped, so the last output voxel edge-clamps there.
Labels are nearest-neighbour (order 0). A 2D resolution ``(R, R)`` resamples in-plane only
and keeps every slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Grid:
    """Output voxel ``o`` samples input coordinate ``scale * o + offset`` (per axis)."""
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    pad: bool                       # outside the input: constant (padding) vs nearest edge
    crop: bool = False              # the output covers part of the input (kits.grid)

    def to_dict(self) -> dict:
        d = {"in_shape": list(self.in_shape), "out_shape": list(self.out_shape),
             "scale": list(self.scale), "offset": list(self.offset), "pad": self.pad}
        return {**d, "crop": True} if self.crop else d

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(tuple(d["in_shape"]), tuple(d["out_shape"]), tuple(d["scale"]),
                   tuple(d["offset"]), bool(d["pad"]), bool(d.get("crop", False)))


def native_shape(in_shape, spacing, native_mm) -> tuple[int, int, int]:
    """The shape of a case of ``in_shape`` voxels of ``spacing`` mm at ``native_mm`` voxels."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(in_shape, spacing, native_mm))


def grid(in_shape, spacing, resolution, mode: str = "stretch", spacing_mm: float = 0.0,
         native_mm=(1.62, 1.62, 3.22)) -> Grid:
    """The map from a canonical volume ``in_shape`` (voxel ``spacing`` mm) to ``resolution``
    (3 sizes, or 2 for in-plane only: the slices are kept); ``"native"`` ignores
    ``resolution`` and resamples to ``native_mm`` voxels."""
    in_shape = tuple(int(s) for s in in_shape)
    spacing = [float(s) for s in spacing]
    res = tuple(int(r) for r in resolution)
    if len(res) not in (2, 3) or min(res) < 1:
        raise ValueError(f"data.resolution must be 2 or 3 positive sizes, got {resolution}")
    if mode == "native":
        if len(native_mm) != 3 or min(native_mm) <= 0:
            raise ValueError(f"data.native_spacing_mm must be 3 sizes > 0, got {native_mm}")
        res = native_shape(in_shape, spacing, native_mm)
    out = res + (in_shape[2],) if len(res) == 2 else res
    axes = len(res)
    if mode in ("stretch", "native"):
        scale = [n / r for n, r in zip(in_shape[:axes], res)]
        offset = [s / 2 - 0.5 for s in scale]
    elif mode == "spacing":
        if spacing_mm < 0:
            raise ValueError(f"data.spacing_mm must be >= 0, got {spacing_mm}")
        mm = spacing_mm or max(n * s / r for n, s, r in zip(in_shape, spacing, res))
        scale = [mm / s for s in spacing[:axes]]
        offset = [(n - 1) / 2 - a * (r - 1) / 2 for n, a, r in zip(in_shape, scale, res)]
    else:
        raise ValueError(f"data.resample '{mode}' is not one of stretch, spacing, native")
    if axes == 2:
        scale, offset = scale + [1.0], offset + [0.0]
    return Grid(in_shape, out, tuple(scale), tuple(offset), mode == "spacing")


def _block_mean(x: np.ndarray, k) -> np.ndarray:
    """Average non-overlapping blocks of ``k`` voxels per axis, one axis at a time (the first
    pass shrinks the array k-fold). Block j covers voxels ``[j*k, (j+1)*k)``; the last
    ``n mod k`` voxels (less than one output voxel) are left out — the resampling clamps there."""
    for ax, b in enumerate(k):
        if b > 1:
            m = x.shape[ax] // b
            x = np.moveaxis(x, ax, 0)[:m * b]
            x = np.moveaxis(x.reshape((m, b) + x.shape[1:]).mean(axis=1, dtype=np.float32), 0, ax)
    return x


def apply(g: Grid, x: np.ndarray, order: int, cval: float = 0.0, antialias: bool = True,
          ) -> np.ndarray:
    """Resample a canonical array onto ``g.out_shape`` (order 1 image, 0 labels)."""
    if tuple(x.shape) != g.in_shape:
        raise ValueError(f"resample: array shape {x.shape} is not the grid's {g.in_shape}")
    scale, offset = np.array(g.scale), np.array(g.offset)
    if order > 0 and antialias:
        k = [max(1, math.floor(a)) for a in scale]
        x = _block_mean(x, k)
        k = np.array(k, np.float64)
        scale, offset = scale / k, (offset - (k - 1) / 2) / k
    if np.allclose(scale, 1) and np.allclose(offset, 0) and x.shape == g.out_shape:
        return np.array(x, copy=True)
    out_type = x.dtype if order == 0 else np.float32
    return ndimage.affine_transform(x, scale, offset=offset, output_shape=g.out_shape,
                                    output=out_type, order=order,
                                    mode="constant" if g.pad else "nearest", cval=cval)


def to_input_grid(g: Grid, y: np.ndarray, box=None) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`apply` for label maps: ``g.out_shape`` array back
    onto the input grid (outside the resampled region: 0). ``box`` ``(lo, hi)`` (input voxel
    indices, hi exclusive): only that part of the input grid, the same values as the full
    result's ``[lo:hi]``."""
    if tuple(y.shape) != g.out_shape:
        raise ValueError(f"prediction shape {tuple(y.shape)} is not the grid's {g.out_shape}")
    scale, offset = np.array(g.scale), np.array(g.offset)
    if np.allclose(scale, 1) and np.allclose(offset, 0) and y.shape == g.in_shape:
        return np.array(y if box is None else y[tuple(slice(a, b) for a, b in zip(*box))],
                        copy=True)
    if box is None:
        out = ndimage.affine_transform(y, 1 / scale, offset=-offset / scale,
                                       output_shape=g.in_shape, output=y.dtype, order=0,
                                       mode="constant" if g.pad else "nearest", cval=0)
        box = (np.zeros(len(g.in_shape), int), np.array(g.in_shape))
    else:
        # The map is diagonal, so scipy resamples axis by axis (zoom_shift): the same call on
        # each axis's index ramp gives the output index each input voxel takes (-1: outside,
        # padding).
        idx = [ndimage.affine_transform(np.arange(n, dtype=np.int64), [1 / a], offset=-o / a,
                                        output_shape=(m,), order=0, cval=-1,
                                        mode="constant" if g.pad else "nearest")[int(b0):int(b1)]
               for n, m, a, o, b0, b1 in zip(g.out_shape, g.in_shape, scale, offset, *box)]
        out = y[np.ix_(*(np.maximum(i, 0) for i in idx))]
        if g.pad:
            out[(idx[0] < 0)[:, None, None] | (idx[1] < 0)[None, :, None]
                | (idx[2] < 0)[None, None, :]] = 0
    if g.crop:   # input voxels outside the cropped output: background, not the edge repeated
        for ax, (n_out, b0, b1) in enumerate(zip(g.out_shape, *box)):
            o = (np.arange(int(b0), int(b1)) - offset[ax]) / scale[ax]
            outside = (o < -0.5) | (o > n_out - 0.5)
            if outside.any():
                np.moveaxis(out, ax, 0)[outside] = 0
    return out


def input_box(g: Grid, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """The input-grid box ``(lo, hi)`` (hi exclusive) that holds every input voxel
    :func:`to_input_grid` fills from the output box ``[lo, hi)``: a voxel's margin wider,
    and out to the input's edge where the box touches the output's (edge clamping)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    scale, offset = np.array(g.scale), np.array(g.offset)
    n_in, n_out = np.array(g.in_shape), np.array(g.out_shape)
    a = np.floor(offset + scale * (lo - 1.5)).astype(int)
    b = np.ceil(offset + scale * (hi + 0.5)).astype(int) + 1
    a = np.where(lo <= 0, 0, np.clip(a, 0, n_in))
    b = np.where(hi >= n_out, n_in, np.clip(b, 0, n_in))
    return a, b


