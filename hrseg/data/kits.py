"""KiTS19 preprocessing as Wang et al. (2020) ran it (``data.preprocess: kits``).

Wang et al., Sec. 3 (wang-memory-efficient-fcn.txt): "We apply same preprocessing as Isensee
et al. who won the 1st place of the challenge. CT volumes are resampled to same voxel spacing
of 3.22 × 1.62 × 1.62 mm. [...] For each case, intensity is clipped by window width ranges
from 79 to 304 H.U, and normalized by z-score normalization." and Sec. 4: "we need to limit
our input slice size up to 256 × 256 pixels".

What hrseg does, and what it had to choose:

* **Clip** HU to ``CLIP_HU = [-79, 304]``: Wang's "79 to 304" lost its minus sign; Isensee &
  Maier-Hein's KiTS19 entry clips to the 0.5 / 99.5 percentiles of the training set's
  foreground, [-79, 304].
* **z-score with fixed dataset statistics** ``(hu - 101) / 76.9`` (Isensee & Maier-Hein: the
  mean and standard deviation of the KiTS19 training foreground after clipping), not per
  volume: Wang says he applies Isensee's preprocessing, and these are its numbers. (Quoted from
  Isensee & Maier-Hein 2019, which is not in ``shared/papers``; a per-volume z-score would
  change each case's contrast and the tumour synthesis' measured contrast with it.) The network
  therefore sees values in ``network_range() = (-2.34, 2.64)``.
* **Spacing** 3.22 × 1.62 × 1.62 mm is KiTS19's (z, y, x): its files store slices on axis 0.
  hrseg reads every file into canonical RAS+ arrays ``(x, y, z)`` (nifti.read_nifti), so the
  spacing here is ``data.native_spacing_mm = (1.62, 1.62, 3.22)`` (x, y, z) with
  ``data.resample: native`` (resample.py: each case keeps its own extent).
* **In-plane ≤ 256 × 256 by a centred crop** (:func:`grid`): an axis longer than
  ``MAX_IN_PLANE`` voxels after resampling loses ``(n - 256) // 2`` voxels at its low end and
  the rest at its high end; shorter axes are not padded here (buckets.py pads each batch to its
  bucket with the case's minimum, i.e. the clipped air). z is never cropped ("256 × 256 ×
  full"). Predictions mapped back to the source grid are 0 (background) outside the crop.

Order: clip and z-score on the source voxels, then trilinear resampling (both are voxelwise
and the z-score is linear, so only the clip does not commute with the interpolation; nnU-Net
resamples first, which differs by less than the interpolation error at the clip edges).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hrseg.data import resample

CLIP_HU = (-79.0, 304.0)       # Isensee & Maier-Hein's 0.5 / 99.5 foreground percentiles
MEAN_HU, STD_HU = 101.0, 76.9  # their KiTS19 foreground mean / standard deviation (clipped)
SPACING_MM = (1.62, 1.62, 3.22)  # Wang's 3.22 × 1.62 × 1.62 (z, y, x) in hrseg's (x, y, z)
MAX_IN_PLANE = 256             # Wang: "limit our input slice size up to 256 × 256 pixels"
LABELS = {0: "background", 1: "kidney", 2: "tumour"}


def normalise(hu: np.ndarray) -> np.ndarray:
    """HU -> the network's units: ``(clip(hu, -79, 304) - 101) / 76.9``, float32 (a new
    array; the input is untouched)."""
    x = np.clip(np.asarray(hu, np.float32), np.float32(CLIP_HU[0]), np.float32(CLIP_HU[1]))
    x -= np.float32(MEAN_HU)
    x *= np.float32(1 / STD_HU)
    return x


def network_range() -> tuple[float, float]:
    """The values :func:`normalise` can give: the clip range in z-score units."""
    return tuple(float((v - MEAN_HU) / STD_HU) for v in CLIP_HU)


def grid(in_shape, spacing, native_mm=SPACING_MM, max_in_plane: int = MAX_IN_PLANE
         ) -> resample.Grid:
    """The ``resample: native`` grid at ``native_mm``, each in-plane axis (x, y) longer than
    ``max_in_plane`` cropped to it around the centre (see the module docstring)."""
    g = resample.grid(in_shape, spacing, (1, 1, 1), "native", native_mm=native_mm)
    out, offset = list(g.out_shape), list(g.offset)
    for ax in (0, 1):
        if out[ax] > max_in_plane:
            cut = (out[ax] - max_in_plane) // 2
            offset[ax] += g.scale[ax] * cut            # output voxel 0 is source voxel `cut`
            out[ax] = max_in_plane
    return dataclasses.replace(g, out_shape=tuple(out), offset=tuple(offset),
                               crop=tuple(out) != tuple(g.out_shape))
