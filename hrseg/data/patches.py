"""Patch training batches: random crops of the preprocessed volumes, as nnU-Net trains.

``data.patch = [px, py, pz]`` crops every training volume of a step to the patch; a share
``data.patch_foreground`` of the crops (nnU-Net: 1/3) is centred on a labelled voxel: a
foreground class present in the volume is picked uniformly (so the rare tumour class gets as
many centred patches as the liver), then one of its voxels. The other crops are uniform over
the volume. Crops stay inside the volume (a centre near the border moves the crop inwards).

The volumes of a step are those of dataset.batch_for_step (dataset.sample_of_row), and the
crop of each row is a function of ``(seed, step, row)`` only, so a resumed run sees the same
patches. Only the crop is read from the memory-mapped cache, not the whole volume.

    sample = patches.Sampler(ds, cfg.data.patch, cfg.data.patch_foreground)
    images, labels = sample(step, batch=2, seed=0)      # (2, px, py, pz, 1), (2, px, py, pz)
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hrseg.data.dataset import Dataset, Volume, process_rows, sample_of_row

_STREAM = 0x9A7C4  # separates the crop draws from the epoch permutation's ([seed, epoch])
MAX_LOCATIONS = 10_000  # foreground voxels kept per class and volume (nnU-Net samples 10 000)


def crop_corner(rng: np.random.Generator, shape, patch, foreground: float,
                locations: Callable[[], dict[int, np.ndarray]]):
    """``(corner (3,), centred_on_foreground)`` of one crop of a ``shape`` volume.

    ``locations()``: class -> flat voxel indices (:func:`class_locations`), asked for only
    when the draw says "foreground". A volume without foreground gets a uniform crop."""
    shape, patch = np.asarray(shape), np.asarray(patch)
    span = shape - patch                                        # (3,) last valid corner
    if rng.random() < foreground:
        locations = locations()
        classes = sorted(k for k, v in locations.items() if len(v))
        if classes:
            k = classes[rng.integers(len(classes))]
            centre = np.unravel_index(locations[k][rng.integers(len(locations[k]))], shape)
            corner = np.clip(np.asarray(centre) - patch // 2, 0, span)
            return corner.astype(int), True
    return np.array([rng.integers(s + 1) for s in span]), False


def class_locations(label: np.ndarray, limit: int = MAX_LOCATIONS) -> dict[int, np.ndarray]:
    """Foreground class -> up to ``limit`` flat voxel indices (evenly strided: deterministic)."""
    flat = np.asarray(label).reshape(-1)
    out = {}
    for k in np.unique(flat):
        if k == 0:
            continue
        idx = np.flatnonzero(flat == k)
        out[int(k)] = idx[::-(-len(idx) // limit)]               # ceil: at most `limit`
    return out


class Sampler:
    """The crops of a dataset's training volumes; caches each volume's class locations."""

    def __init__(self, ds: Dataset, patch, foreground: float):
        if ds.dims != 3:
            raise ValueError("data.patch: patches are for 3D volumes")
        self.ds, self.patch, self.foreground = ds, tuple(int(p) for p in patch), foreground
        self._locations: dict[int, dict[int, np.ndarray]] = {}

    def locations(self, vol: int) -> dict[int, np.ndarray]:
        if vol not in self._locations:
            self._locations[vol] = class_locations(self.ds.train[vol].labels_u8)
        return self._locations[vol]

    def rng(self, seed: int, step: int, row: int) -> np.random.Generator:
        return np.random.default_rng([int(seed), int(step), int(row), _STREAM])

    def crop(self, v: Volume, vol: int, seed: int, step: int, row: int):
        """``(image (px, py, pz), label (px, py, pz) uint8, corner, centred)`` of one row."""
        corner, centred = crop_corner(self.rng(seed, step, row), v.image.shape, self.patch,
                                      self.foreground, lambda: self.locations(vol))
        sl = tuple(slice(c, c + p) for c, p in zip(corner, self.patch))
        return np.asarray(v.image[sl]), np.asarray(v.labels_u8[sl]), corner, centred

    def __call__(self, step: int, batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the step's batch: ``images (b, px, py, pz, 1)`` float32,
        ``labels (b, px, py, pz)`` int32 (rows as dataset.batch_for_step)."""
        ds = self.ds
        images, labels = [], []
        for g in process_rows(ds, step, batch, process_index, process_count):   # global rows
            vol, _ = sample_of_row(ds, g, seed)
            img, lab, _, _ = self.crop(ds.train[vol], vol, seed, step, g)
            images.append(img[..., None])
            labels.append(lab)
        return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int32)

