"""Sliding-window inference at full resolution, for networks trained on patches.

The volume is covered by patch-sized windows overlapping by half (nnU-Net / MONAI's default),
spaced evenly from the first voxel to the last on each axis, so the last window ends at the
border instead of running past it. Every window's class probabilities are weighted by a
Gaussian importance map (σ = patch / 8, as nnU-Net's ``compute_gaussian`` and MONAI's
``sliding_window_inference(mode="gaussian")``): a window's centre, which saw the most
context, counts more than its edges. The weighted sums are divided by the sum of the
weights, so each voxel gets a convex combination of the windows that cover it.

    probs = sliding_window(fn, image (X, Y, Z, C), patch)   # (X, Y, Z, K)

``fn`` maps a stack of windows ``(n, px, py, pz, C)`` to probabilities ``(n, px, py, pz, K)``;
inference.Predictor passes one that runs each window on the run's mesh.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

OVERLAP = 0.5          # share of a window its neighbour overlaps
SIGMA_SCALE = 1 / 8    # σ of the importance map, as a share of the patch


def starts(size: int, patch: int, overlap: float = OVERLAP) -> list[int]:
    """First voxel of each window on an axis of ``size``: the fewest windows with at most
    ``patch × (1 - overlap)`` between starts, spread evenly over ``[0, size - patch]``."""
    if patch >= size:
        return [0]
    stride = max(1, int(patch * (1 - overlap)))
    n = math.ceil((size - patch) / stride) + 1
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


def windows(shape: Sequence[int], patch: Sequence[int],
            overlap: float = OVERLAP) -> list[tuple[slice, ...]]:
    """The windows covering a volume of ``shape``, as tuples of slices."""
    axes = [starts(s, p, overlap) for s, p in zip(shape, patch)]
    return [tuple(slice(c, c + p) for c, p in zip(corner, patch))
            for corner in itertools.product(*axes)]


def gaussian(patch: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """Importance map ``(px, py, pz)`` float32: a Gaussian centred on the window with
    σ = ``sigma_scale × patch`` per axis, 1 at the centre; strictly positive, so a voxel
    covered only by window edges still gets a weight."""
    w = np.ones((), np.float64)
    for p in patch:
        x = np.arange(p) - (p - 1) / 2
        g = np.exp(-0.5 * (x / max(p * sigma_scale, 1e-6)) ** 2)
        w = np.multiply.outer(w, g / g.max())
    return np.maximum(w, np.finfo(np.float32).tiny).astype(np.float32)


def sliding_window(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray,
                   patch: Sequence[int], batch: int = 1, overlap: float = OVERLAP,
                   sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """Gaussian-weighted sliding-window prediction of ``image (X, Y, Z, C)`` ->
    ``(X, Y, Z, K)`` float32, running ``fn`` on ``batch`` windows at a time (the last stack is
    filled up by repeating its last window). An axis shorter than the patch is zero-padded
    to it, and the padding cropped off the result."""
    image = np.asarray(image, np.float32)
    shape = image.shape[:3]
    pad = [(0, max(0, p - s)) for s, p in zip(shape, patch)]
    if any(b for _, b in pad):
        image = np.pad(image, pad + [(0, 0)])
    weight = gaussian(patch, sigma_scale)                                # (px, py, pz)
    wins = windows(image.shape[:3], patch, overlap)
    acc, norm = None, np.zeros(image.shape[:3], np.float32)              # (X, Y, Z)
    for i in range(0, len(wins), batch):
        part = wins[i:i + batch]
        stack = np.stack([image[w] for w in part + part[-1:] * (batch - len(part))])
        probs = np.asarray(fn(stack), np.float32)[:len(part)]            # (n, px, py, pz, K)
        if acc is None:
            acc = np.zeros((*image.shape[:3], probs.shape[-1]), np.float32)
        for w, p in zip(part, probs):
            acc[w] += p * weight[..., None]
            norm[w] += weight
    out = acc / norm[..., None]
    return out[:shape[0], :shape[1], :shape[2]]
