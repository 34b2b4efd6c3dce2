"""Native-size volumes in a handful of shapes: bucketed padding and same-bucket batches.

``data.resample: native`` gives every case its own shape. The network needs each spatial axis
to be a multiple of ``m = (devices on that axis) × 2^poolings`` (partition.check_divisible),
and every distinct shape is one more compilation. So each axis of ``n`` voxels is padded up to
the smallest *allowed* size ``m·k ≥ n`` with ``k ∈ K_q = {⌈2^(j/q)⌉ : j ≥ 0}``
(``q = data.buckets_per_octave``): at most ``q`` sizes per doubling of the axis, and an axis
grows by less than ``2^(1/q)`` (26 % at q = 3) once ``n ≥ m·q``.

Nothing is cropped. Padding goes at the high end of each axis (voxels ``[n, N)``), so the
case's own grid is the corner ``[:n]`` and :func:`crop` undoes :func:`pad` exactly. Padded
labels are ``metrics.IGNORE`` (−1: left out of every loss, count and score); padded image
voxels get the case's minimum, its background (on CT: air, i.e. 0 = the HU window's low end).

Batches of more than one case hold cases of one bucket. Each epoch the training cases are
shuffled (``rng([seed, epoch])``, as dataset.sample_of_row), grouped by bucket in that order,
each bucket cut into batches of ``B`` (its last batch filled up by starting over that bucket's
cases), and the batches shuffled (``rng([seed, epoch, _STREAM])``). The number of batches per
epoch does not depend on the seed, so the cases of step ``s`` are a function of
``(seed, s)`` only and a resumed run sees the same batches.

    sample = buckets.Sampler(ds, multiple=(8, 8, 8), per_octave=3)
    images, labels = sample(step, batch=2, seed=0)    # (2, X, Y, Z, 1), (2, X, Y, Z)
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from hrseg.data.dataset import Dataset, process_rows
from hrseg.metrics import IGNORE

_STREAM = 0xB0C7   # separates the batch shuffle from the epoch permutation's ([seed, epoch])


@lru_cache(maxsize=256)
def allowed_factors(per_octave: int, upto: int) -> tuple[int, ...]:
    """``K_q``: the sorted distinct ``⌈2^(j/q)⌉`` up to the first one ≥ ``upto``."""
    if per_octave < 1:
        raise ValueError(f"data.buckets_per_octave must be >= 1, got {per_octave}")
    out, j = [], 0
    while not out or out[-1] < upto:
        k = math.ceil(2 ** (j / per_octave) - 1e-9)   # 2^(q/q) = 2 exactly, not 3
        if not out or k > out[-1]:
            out.append(k)
        j += 1
    return tuple(out)


def bucket_size(n: int, multiple: int, per_octave: int) -> int:
    """The smallest allowed size ``multiple·k ≥ n`` (``k ∈ K_q``)."""
    if n < 1 or multiple < 1:
        raise ValueError(f"bucket_size: need n >= 1 and multiple >= 1, got {n}, {multiple}")
    need = -(-int(n) // int(multiple))
    return int(multiple) * next(k for k in allowed_factors(int(per_octave), need) if k >= need)


def bucket_shape(shape, multiple, per_octave: int) -> tuple[int, ...]:
    """Per-axis :func:`bucket_size` of a case's spatial ``shape``."""
    if len(shape) != len(multiple):
        raise ValueError(f"bucket_shape: shape {tuple(shape)} and multiple {tuple(multiple)} "
                         f"differ in rank")
    return tuple(bucket_size(n, m, per_octave) for n, m in zip(shape, multiple))


def background(image: np.ndarray) -> float:
    """The image value padding gets: the case's minimum (air after the HU window)."""
    return float(np.min(image))


def pad(image: np.ndarray, label: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(image (*shape) float32, label (*shape) int32)``: the case in the corner
    ``[:n]`` of each axis; the rest image = :func:`background`, label = IGNORE."""
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape or any(n > s for n, s in zip(image.shape, shape)):
        raise ValueError(f"pad: image {image.shape} / label {label.shape} do not fit in "
                         f"{tuple(shape)} (nothing is cropped)")
    corner = tuple(slice(0, n) for n in image.shape)
    img = np.full(tuple(shape), background(image), np.float32)
    lab = np.full(tuple(shape), IGNORE, np.int32)
    img[corner], lab[corner] = image, label
    return img, lab


def pad_image(image: np.ndarray, shape) -> np.ndarray:
    """:func:`pad` for an image alone (prediction)."""
    return pad(image, np.zeros(np.shape(image), np.int8), shape)[0]


def crop(volume: np.ndarray, shape) -> np.ndarray:
    """The case's own grid ``[:n]`` of a padded ``volume`` (inverse of :func:`pad`)."""
    return np.asarray(volume)[tuple(slice(0, n) for n in shape)]


class Sampler:
    """Training batches of a native-size dataset, each of one bucket (see the module doc)."""

    def __init__(self, ds: Dataset, multiple, per_octave: int):
        if ds.dims != 3:
            raise ValueError("data.resample 'native': bucketed batches are for 3D volumes")
        self.ds, self.multiple, self.per_octave = ds, tuple(int(m) for m in multiple), per_octave
        self.buckets = [bucket_shape(v.image.shape, self.multiple, per_octave)
                        for v in ds.train]                         # one per training case
        self._epochs: dict[tuple[int, int, int], list[list[int]]] = {}

    def epoch(self, seed: int, epoch: int, batch: int) -> list[list[int]]:
        """The batches (lists of training-case indices) of one epoch, in step order."""
        key = (int(seed), int(epoch), int(batch))
        if key not in self._epochs:
            order = np.random.default_rng([key[0], key[1]]).permutation(len(self.buckets))
            groups: dict[tuple, list[int]] = {}
            for i in order.tolist():
                groups.setdefault(self.buckets[i], []).append(i)
            batches = []
            for shape in sorted(groups):                 # a fixed order, then shuffled
                cases = groups[shape]
                for start in range(0, len(cases), batch):
                    batches.append([cases[(start + j) % len(cases)] for j in range(batch)])
            perm = np.random.default_rng([key[0], key[1], _STREAM]).permutation(len(batches))
            if len(self._epochs) > 8:
                self._epochs.clear()
            self._epochs[key] = [batches[p] for p in perm.tolist()]
        return self._epochs[key]

    def batches_per_epoch(self, batch: int) -> int:
        counts: dict[tuple, int] = {}
        for b in self.buckets:
            counts[b] = counts.get(b, 0) + 1
        return sum(-(-c // batch) for c in counts.values())

    def cases_of_step(self, step: int, batch: int, seed: int) -> list[int]:
        """The training-case indices of the step's global batch (all of one bucket)."""
        epoch, pos = divmod(int(step), self.batches_per_epoch(batch))
        return self.epoch(seed, epoch, batch)[pos]

    def shape_of_step(self, step: int, batch: int, seed: int) -> tuple[int, int, int]:
        """The padded spatial shape of the step's batch."""
        return self.buckets[self.cases_of_step(step, batch, seed)[0]]

    def __call__(self, step: int, batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the step's batch: ``images (b, X, Y, Z, 1)`` float32,
        ``labels (b, X, Y, Z)`` int32 with IGNORE on the padding (rows as
        dataset.process_rows: ``[p*b, (p+1)*b)`` of the global batch)."""
        cases = self.cases_of_step(step, batch, seed)
        shape = self.buckets[cases[0]]
        images, labels = [], []
        for g in process_rows(self.ds, step, batch, process_index, process_count):
            v = self.ds.train[cases[g - step * batch]]
            img, lab = pad(v.image, v.labels_u8, shape)
            images.append(img[..., None])
            labels.append(lab)
        return np.stack(images), np.stack(labels)
