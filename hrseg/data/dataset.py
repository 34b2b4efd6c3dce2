"""CT datasets -> network inputs: NIfTI (LiTS / MSD / KiTS) -> canonical RAS -> HU window -> R³,
cached per resolution, split into train / validation, batched deterministically.
(``data.preprocess: kits``: clip, z-score and the in-plane crop of kits.py instead of the window.)

    ds = load_dataset(cfg.data)                     # .train / .val: lists of Volume
    images, labels = batch_for_step(ds, step, batch=2, seed=0)

Preprocessed volumes are cached under ``cache_dir/<resolution>-<resample>/`` as ``.npy``
files (memory-mapped on load, so a 512³ dataset does not have to fit in RAM). The cache key
holds the preprocessing settings and each source file's path, size and mtime: a second load
reads the cache and resamples nothing; editing a file or a setting preprocesses again. Each
entry's sidecar also records the sources' SHA-256 and the arrays' checksums (hrseg.data.cache):
a damaged or stale entry is rebuilt with one line.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from hrseg.config import DataConfig
from hrseg.data import cache, integrity, kits, nifti, resample
from hrseg.data.integrity import verify_dataset  # noqa: F401  (public: hrseg.data.verify_dataset)
from hrseg.data.nifti import Case, find_cases, read_nifti  # public here too

CACHE_VERSION = 2    # bump when preprocessing or the entry format changes (2: verified sidecars)
PAPER_VAL_FRACTION = 32 / 131  # the paper's LiTS split: 99 train / 32 validation


def window(hu: np.ndarray, hu_window=(-512.0, 512.0)) -> np.ndarray:
    """HU -> [0, 1] float32: ``clip((hu - lo) / (hi - lo), 0, 1)``. The default is Mesh-TF's
    ``clip(hu / 1024 + 0.5, 0, 1)``."""
    lo, hi = (float(v) for v in hu_window)
    if not hi > lo:
        raise ValueError(f"data.hu_window must be (low, high) with high > low, got {hu_window}")
    x = np.asarray(hu, np.float32) - np.float32(lo)     # a new array: the input is untouched
    x *= np.float32(1 / (hi - lo))
    return np.clip(x, 0, 1, out=x)


def _spacing(affine_or_spacing) -> np.ndarray:
    a = np.asarray(affine_or_spacing, np.float64)
    return nifti.spacing_of(a) if a.shape == (4, 4) else a.reshape(3)


def grid_for(shape, affine_or_spacing, cfg: DataConfig) -> resample.Grid:
    """The resampling grid ``cfg`` gives a canonical volume of ``shape``."""
    if cfg.preprocess == "kits":
        return kits.grid(shape, _spacing(affine_or_spacing), cfg.native_spacing_mm)
    return resample.grid(shape, _spacing(affine_or_spacing), cfg.resolution, cfg.resample,
                         cfg.spacing_mm, cfg.native_spacing_mm)


def preprocess(hu: np.ndarray, affine_or_spacing, cfg: DataConfig) -> np.ndarray:
    """Canonical HU volume -> network image: window, resample -> float32 in [0, 1]
    (``preprocess: kits``: z-scores, see kits.py).

    3D resolution: ``(R, R, R)``; 2D ``(R, R)``: ``(R, R, Z)`` (in-plane only)."""
    return _image_on(grid_for(hu.shape, affine_or_spacing, cfg), hu, cfg)


def preprocess_label(label: np.ndarray, affine_or_spacing, cfg: DataConfig) -> np.ndarray:
    """Canonical label volume -> the network grid (nearest neighbour), int32."""
    return _label_on(grid_for(label.shape, affine_or_spacing, cfg), label).astype(np.int32)


def network_units(hu: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """HU -> the values the network sees (before resampling): the window's [0, 1], or the
    KiTS z-score (``data.preprocess``)."""
    return kits.normalise(hu) if cfg.preprocess == "kits" else window(hu, cfg.hu_window)


def _image_on(g: resample.Grid, hu: np.ndarray, cfg: DataConfig) -> np.ndarray:
    return resample.apply(g, network_units(hu, cfg), order=1, antialias=cfg.antialias)


def _label_on(g: resample.Grid, label: np.ndarray) -> np.ndarray:   # uint8 on the grid
    return resample.apply(g, np.asarray(label, np.uint8), order=0)


@dataclass(frozen=True)
class Volume:
    """A preprocessed case: ``image`` float32 in [0, 1] and ``label`` int32, both on the
    network grid (3D ``(R, R, R)``, 2D ``(R, R, Z)``; ``resample: native``: the case's own
    shape at the native spacing, padded to a bucket only when batched, see buckets.py); ``meta`` holds the source files, the
    original shape/affine/spacing and the resampling grid (see to_original_geometry)."""
    id: str
    image: np.ndarray
    labels_u8: np.ndarray = field(repr=False)
    meta: dict = field(repr=False)

    @property
    def label(self) -> np.ndarray:
        return self.labels_u8.astype(np.int32)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm per voxel of ``image``: the source spacing times the resampling grid's step."""
        return tuple(float(s) * float(k) for s, k in
                     zip(self.meta["spacing"], self.meta["grid"]["scale"]))

    @property
    def hu_window(self) -> tuple[float, float]:
        """The HU mapped to [0, 1] in ``image`` (data.hu_window)."""
        return tuple(float(v) for v in self.meta["hu_window"])


@dataclass(frozen=True)
class Dataset:
    train: list[Volume]
    val: list[Volume]
    cfg: DataConfig

    @property
    def dims(self) -> int:
        return len(self.cfg.resolution)


def split(ids: list[str], n_val: int = 0, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic ``(train, val)`` ids; ``n_val=0``: the paper's ratio 32/131 (≥ 1)."""
    n = len(ids)
    if n_val < 0 or (n_val and n_val >= n):
        raise ValueError(f"data.n_val={n_val} must leave at least one training case "
                         f"(the dataset has {n})")
    if not n_val:
        n_val = 0 if n < 2 else min(n - 1, max(1, round(n * PAPER_VAL_FRACTION)))
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return ([i for k, i in enumerate(ids) if k not in val],
            [i for k, i in enumerate(ids) if k in val])


def _stat(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _settings(cfg: DataConfig) -> dict:
    out = {"version": CACHE_VERSION, "resolution": list(cfg.resolution),
           "resample": cfg.resample, "spacing_mm": cfg.spacing_mm,
           "hu_window": list(cfg.hu_window), "antialias": cfg.antialias}
    if cfg.resample == "native":   # only here: the other modes' cache keys stay as they were
        out["native_spacing_mm"] = list(cfg.native_spacing_mm)
    if cfg.preprocess != "window":
        out["preprocess"] = cfg.preprocess
    return out


def cache_dir(cfg: DataConfig) -> Path:
    if cfg.resample == "native":   # each case keeps its own shape: named by the voxel size
        kind = "kits-native" if cfg.preprocess == "kits" else "native"
        return Path(cfg.cache_dir) / f"{kind}-{'x'.join(map(str, cfg.native_spacing_mm))}mm"
    return Path(cfg.cache_dir) / f"{'x'.join(map(str, cfg.resolution))}-{cfg.resample}"


def _cache_stem(case: Case, cfg: DataConfig) -> Path:
    key = json.dumps({"settings": _settings(cfg), "image": _stat(case.image),
                      "label": _stat(case.label)}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir(cfg) / f"{case.id}-{digest}"


def preprocess_case(case: Case, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read, check and preprocess one case: ``(image, label uint8, meta)``."""
    import nibabel as nib
    if case.label is None:
        raise ValueError(f"{case.image}: no label file (run `hrseg verify` on the dataset)")
    hu, affine, spacing = read_nifti(case.image)
    lab, laffine, _ = read_nifti(case.label)
    problems = []
    if hu.shape != lab.shape:
        problems.append(f"shape mismatch: image {hu.shape} vs label {lab.shape}")
    elif np.abs(affine - laffine).max() > integrity.AFFINE_TOL_MM:
        problems.append("affine mismatch between image and label")
    problems += [p for p in (integrity.nonfinite_problem(hu), integrity.label_problem(lab)) if p]
    if problems:
        raise ValueError(f"{case.image.name} / {case.label.name}: {'; '.join(problems)} "
                         f"(run `hrseg verify {case.image.parent}`)")
    g = grid_for(hu.shape, spacing, cfg)
    image, label = _image_on(g, hu, cfg), _label_on(g, lab)
    stored = nib.load(str(case.image))
    meta = {"id": case.id, "image_path": str(case.image), "label_path": str(case.label),
            "shape": list(nifti.spatial_shape(stored)),
            "affine": np.asarray(stored.affine, np.float64).tolist(),
            "spacing": spacing.tolist(), "grid": g.to_dict(), **_settings(cfg)}
    return image, label, meta


def load_volume(case: Case, cfg: DataConfig) -> Volume:
    """One case on the network grid, from the cache or preprocessed (and then cached); an
    entry whose source or arrays changed is rebuilt (hrseg.data.cache)."""
    def build():
        image, label, meta = preprocess_case(case, cfg)
        return image.astype(np.float32), label.astype(np.uint8), meta

    image, label, meta = cache.load(_cache_stem(case, cfg),
                                    {"image": case.image, "label": case.label}, build)
    return Volume(case.id, image, label, meta)


def load_dataset(cfg: DataConfig, process_index: int = 0, process_count: int = 1,
                 workers: int | None = None) -> Dataset:
    """The dataset of ``cfg.root`` on the network grid, split into ``.train`` / ``.val``.

    Every process gets every case (they are memory-mapped: only what a batch touches is
    read). Each process preprocesses its own share of the uncached cases first, so
    processes sharing a cache folder split the work; writes are atomic.
    """
    cases = find_cases(cfg.root, cfg.layout)
    if cfg.max_cases:
        cases = cases[:cfg.max_cases]
    missing = [c.image.name for c in cases if c.label is None]
    if missing:
        raise ValueError(f"{cfg.root}: {len(missing)} case(s) without a label file "
                         f"({', '.join(missing[:5])}); run `hrseg verify {cfg.root}`")
    if not cases:
        raise ValueError(f"{cfg.root}: no cases")
    order = sorted(range(len(cases)), key=lambda i: (i % process_count != process_index, i))
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:   # inflate/resample release the GIL
        loaded = dict(zip(order, pool.map(lambda i: load_volume(cases[i], cfg), order)))
    volumes = [loaded[i] for i in range(len(cases))]
    train_ids, val_ids = split([c.id for c in cases], cfg.n_val, cfg.split_seed)
    by_id = {v.id: v for v in volumes}
    return Dataset([by_id[i] for i in train_ids], [by_id[i] for i in val_ids], cfg)


@lru_cache(maxsize=64)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _items(ds: Dataset) -> list[tuple[int, int]]:
    """Training samples: a volume index (3D), or (volume, slice) pairs (2D)."""
    if ds.dims == 3:
        return [(i, -1) for i in range(len(ds.train))]
    return [(i, z) for i, v in enumerate(ds.train) for z in range(v.image.shape[2])]


def process_rows(ds: Dataset, step: int, batch: int, process_index: int = 0,
                 process_count: int = 1) -> range:
    """Global row numbers ``step × batch + j`` of this process's share of the step's batch:
    rows ``[p*b, (p+1)*b)`` with ``b = batch / process_count``."""
    if batch % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"batch {batch} must split evenly over {process_count} processes "
                         f"(process_index {process_index})")
    if not ds.train:
        raise ValueError("the dataset has no training cases")
    b = batch // process_count
    return range(step * batch + process_index * b, step * batch + (process_index + 1) * b)


def sample_of_row(ds: Dataset, row: int, seed: int) -> tuple[int, int]:
    """``(volume index, slice or -1)`` of global training row ``row = step × batch + j``:
    the samples in a fresh permutation each epoch (patches.py crops the same volumes)."""
    items = _items(ds)
    epoch, pos = divmod(row, len(items))
    return items[int(_permutation(int(seed), epoch, len(items))[pos])]


def stack_slices(image: np.ndarray, z: int | None = None, slices: int = 5) -> np.ndarray:
    """2D inputs: ``slices`` adjacent axial slices (edge-clamped) as channels.

    ``z`` given: ``(X, Y, slices)`` centred on slice z; None: every slice, ``(Z, X, Y, slices)``.
    """
    n = image.shape[2]
    centre = np.arange(n) if z is None else np.array([z])
    idx = np.clip(centre[:, None] + np.arange(slices) - slices // 2, 0, n - 1)
    out = np.moveaxis(np.asarray(image)[:, :, idx], 2, 0)      # (k, X, Y, slices)
    return out if z is None else out[0]


def batch_for_step(ds: Dataset, step: int, batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of ``step``: a function of ``(seed, step)`` only (bit-identical on
    resume). Samples go through a fresh permutation each epoch. This process gets rows
    ``[p*b, (p+1)*b)`` of the global batch, ``b = batch / process_count``.

    3D: ``images (b, X, Y, Z, 1)`` float32, ``labels (b, X, Y, Z)`` int32.
    2D: ``images (b, X, Y, slices_2d)`` (adjacent slices as channels), ``labels (b, X, Y)``.
    """
    images, labels = [], []
    for g in process_rows(ds, step, batch, process_index, process_count):
        vol, z = sample_of_row(ds, g, seed)
        v = ds.train[vol]
        if z < 0:
            images.append(np.asarray(v.image)[..., None])
            labels.append(v.label)
        else:
            images.append(stack_slices(v.image, z, ds.cfg.slices_2d))
            labels.append(np.asarray(v.labels_u8[:, :, z], np.int32))
    return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int32)


def to_original_geometry(pred: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """A label map on the network grid -> ``(label map in the source file's voxel grid and
    orientation, that file's affine)``: undoes the resampling (nearest) and reorientation,
    so it overlays the original CT (write it with nifti.write_nifti)."""
    g = resample.Grid.from_dict(meta["grid"])
    pred = np.asarray(pred)
    small = pred.astype(np.uint8) if pred.min() >= 0 and pred.max() < 256 else pred
    canonical = resample.to_input_grid(g, small)
    affine = np.asarray(meta["affine"], np.float64)
    out = np.ascontiguousarray(nifti.from_canonical(canonical, affine))
    return out.astype(pred.dtype, copy=False), affine
