"""Dataset integrity check before any training (like nnU-Net's ``--verify_dataset_integrity``).

``verify_dataset(path)`` returns one line per problem (empty when clean): empty or missing
directory, an image or label without its partner, unreadable or truncated files, image/label
shape or affine mismatch, NaN/Inf voxels, labels outside {0, 1, 2}. Every file is read in
full — a truncated gzip stream only shows when its end is reached.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hrseg.data import nifti

AFFINE_TOL_MM = 1e-3        # image and label affines must agree to this (mm)


def _name(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _read(path: Path, root: Path, problems: list[str]):
    """``(image object, data)`` or None after appending the problem line."""
    if not path.is_file():
        problems.append(f"{_name(path, root)}: file listed but missing")
        return None
    try:
        img = nifti._load(path)
    except ValueError as e:
        problems.append(f"{_name(path, root)}: unreadable: {str(e).split(': ', 1)[-1]}")
        return None
    try:
        data = np.asanyarray(img.dataobj)
    except nifti.read_errors() as e:
        problems.append(f"{_name(path, root)}: truncated or unreadable data "
                        f"({type(e).__name__}: {e})")
        return None
    return img, data


def label_problem(data: np.ndarray) -> str | None:
    """Why a label array is not a valid {0, 1, 2} map, or None."""
    if data.dtype.kind in "ui":
        lo, hi = int(data.min()), int(data.max())
        if lo >= 0 and hi <= 2:
            return None
        bad = data[(data < 0) | (data > 2)]
    else:
        ok = (data == 0) | (data == 1) | (data == 2)
        if ok.all():
            return None
        bad = data[~ok]
    values = np.unique(bad[:100000])
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", …" if len(values) > 8 else "")
    return f"labels outside {{0, 1, 2}}: {bad.size} voxels with values {shown}"


def nonfinite_problem(data: np.ndarray) -> str | None:
    """``"N NaN and M Inf voxels"`` for float data that has them, else None."""
    if data.dtype.kind != "f":
        return None
    nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
    if nan or inf:
        return f"{nan} NaN and {inf} Inf voxels"
    return None


def pair_problems(img, data, lab, ldata) -> list[str]:
    """Shape / affine / value problems of one image-label pair (without file names)."""
    out = []
    shape, lshape = nifti.spatial_shape(img), nifti.spatial_shape(lab)
    if len(shape) != 3:
        out.append(f"image is not 3D: shape {tuple(img.shape)}")
    if shape != lshape:
        out.append(f"shape mismatch: image {shape} vs label {lshape}")
    diff = float(np.abs(np.asarray(img.affine) - np.asarray(lab.affine)).max())
    if diff > AFFINE_TOL_MM:
        out.append(f"affine mismatch: image and label differ by up to {diff:.4g} mm "
                   f"(image spacing {np.round(nifti.spacing_of(img.affine), 3).tolist()}, "
                   f"label {np.round(nifti.spacing_of(lab.affine), 3).tolist()})")
    if data is not None:
        why = nonfinite_problem(data)
        if why:
            out.append(f"image has {why}")
    if ldata is not None:
        why = nonfinite_problem(ldata) or label_problem(ldata)
        if why:
            out.append(why)
    return out


def _check(case: nifti.Case, root: Path) -> list[str]:
    problems: list[str] = []
    image = _read(case.image, root, problems)
    label = _read(case.label, root, problems) if case.label is not None else None
    if image is None or label is None:
        return problems
    where = f"{_name(case.image, root)} / {_name(case.label, root)}"
    problems += [f"{where}: {p}" for p in pair_problems(image[0], image[1], *label)]
    return problems


def verify_dataset(path, layout: str = "auto", workers: int | None = None) -> list[str]:
    """One line per problem of the dataset at ``path`` (LiTS, MSD or KiTS19 layout); [] when
    clean."""
    root = Path(path)
    if not root.exists():
        return [f"{root}: no such directory"]
    if not root.is_dir():
        return [f"{root}: not a directory"]
    try:
        cases, orphans = nifti.scan(root, layout)
    except ValueError as e:
        return [str(e)]
    problems = []
    for c in cases:
        if c.label is None:
            problems.append(f"{_name(c.image, root)}: missing partner file (no label)")
    for p in orphans:
        problems.append(f"{_name(p, root)}: missing partner file (no image)")
    ids = [c.id for c in cases]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"case {dup}: listed more than once")
    paired = [c for c in cases if c.label is not None]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:   # gzip inflation releases the GIL
        for lines in pool.map(lambda c: _check(c, root), paired):
            problems += lines
    return problems
