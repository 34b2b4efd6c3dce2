"""Which files make up a case, and how its arrays become napari layers (no napari import here).

File conventions (what ``hrseg view`` and the napari reader accept):

- LiTS: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]`` in the same folder.
- MSD: ``imagesTr/X.nii.gz`` (or ``imagesTs/``) with ``labelsTr/X.nii.gz``.
- Predictions: ``prediction-N.nii[.gz]`` (LiTS) or ``X.nii[.gz]`` (MSD), looked for next to the
  volume, then in a ``predictions/`` folder beside it (or beside ``imagesTr/``), and, for a run
  directory, in ``<run>/predictions/``. A run directory is a folder with ``predictions/``; its
  CT volumes come from ``--data DIR`` or from ``data.root`` of the run's ``config.yaml``.
- A dataset folder (LiTS files, or ``imagesTr/``) opens one case: ``case`` (its number or
  name) or the first one.

Layers hold the canonical RAS+ ``(X, Y, Z)`` volume (from :func:`hrseg.data.dataset.read_nifti`)
reversed on every axis and transposed to ``(Z, Y, X)`` (:func:`to_display`): napari slices its
first axis, so the default view is axial in radiological orientation (anterior up, the patient's
right on the left, the same picture as :mod:`hrseg.viz.figures`), slice 0 is the most superior, and the
map is a rotation (3D views are not mirrored). ``scale`` is ``(sz, sy, sx)`` in mm.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrseg.train import rundir

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABEL_COLOURS = {0: "transparent", 1: "#00ff00", 2: "#ff0000", None: "#ff00ff"}
PREDICTION_COLOURS = {0: "transparent", 1: "#ffff00", 2: "#ffa500", None: "#ff00ff"}
_LITS = re.compile(r"^(volume|segmentation|prediction)-(\d+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class ViewedCase:
    """The files the viewer opens for one case (hrseg.data.nifti.Case is a training case)."""
    name: str                       # "volume-3" (LiTS) or "liver_3" (MSD)
    volume: Path | None             # CT image; None when only labels are opened
    labels: Path | None = None
    prediction: Path | None = None


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for s in (".nii.gz", ".nii"):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _first_existing(folder: Path, stem: str) -> Path | None:
    for s in (".nii.gz", ".nii"):
        p = folder / f"{stem}{s}"
        if p.is_file():
            return p
    return None


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _lits_prediction(folder: Path, n: str, run: Path | None = None) -> Path | None:
    for d in ([rundir.predictions(run)] if run else []) + [folder, folder / "predictions"]:
        p = _first_existing(d, f"prediction-{n}")
        if p:
            return p
    return None


def case_for_file(path: Path, run: Path | None = None) -> ViewedCase:
    """The case a NIfTI file belongs to (its partners looked up by the conventions above)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    m = _LITS.match(path.name)
    folder = path.parent
    if m and m.group(1) == "volume":
        n = m.group(2)
        return ViewedCase(f"volume-{n}", path, _first_existing(folder, f"segmentation-{n}"),
                          _lits_prediction(folder, n, run))
    if m:                                  # a segmentation or prediction alone: labels only
        return ViewedCase(_stem(path), None, path if m.group(1) == "segmentation" else None,
                          path if m.group(1) == "prediction" else None)
    stem = _stem(path)
    if folder.name in ("imagesTr", "imagesTs"):
        root = folder.parent
        pred = None
        for d in ([rundir.predictions(run)] if run else []) + [root / "predictions"]:
            pred = pred or _first_existing(d, stem)
        return ViewedCase(stem, path, _first_existing(root / "labelsTr", stem), pred)
    if folder.name == "labelsTr":
        return ViewedCase(stem, None, path, None)
    if folder.name == "predictions":
        return ViewedCase(stem, None, None, path)
    return ViewedCase(stem, path)


def _dataset_cases(folder: Path) -> dict[Path, Path | None]:
    """CT file -> label file of a LiTS/MSD dataset folder, in natural order
    (``hrseg.data.nifti.find_cases``: LiTS in any sub-folder, MSD via dataset.json or imagesTr/);
    empty when it holds none."""
    from hrseg.data.nifti import find_cases
    try:
        return {c.image: c.label for c in find_cases(folder)}
    except ValueError:
        return {}


def _dataset_case(image: Path, label: Path | None, run: Path | None = None) -> ViewedCase:
    found = case_for_file(image, run=run)
    return ViewedCase(found.name, found.volume, found.labels or label, found.prediction)


def _pick(candidates: list[Path], case, where: Path) -> Path:
    if case is None:
        return candidates[0]
    want = str(case)
    number = int(want) if want.isdigit() else None
    for p in candidates:
        m = _LITS.match(p.name)
        if (_stem(p) == want or (number is not None and m and int(m.group(2)) == number)
                or re.search(rf"_0*{re.escape(want)}$", _stem(p))):
            return p
    names = ", ".join(_stem(p) for p in candidates[:8]) + (" …" if len(candidates) > 8 else "")
    raise FileNotFoundError(f"no case {want!r} in {where} (cases: {names})")


def _run_data_root(run: Path) -> Path | None:
    if not rundir.is_run(run):
        return None
    root = Path(rundir.read_config(run).data.root)
    return root if root.is_absolute() or root.exists() else run / root


def find_case(path, case=None, data=None) -> ViewedCase:
    """Resolve a ``hrseg view`` argument: a NIfTI file, a dataset folder, or a run folder."""
    path = Path(path)
    if path.is_file():
        return case_for_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or directory: {path}")

    preds_dir = rundir.predictions(path)
    if preds_dir.is_dir() and not _dataset_cases(path):
        preds = sorted((p for p in preds_dir.iterdir() if is_nifti(p)
                        and not p.name.startswith(".")), key=_natural_key)
        if not preds:
            raise FileNotFoundError(f"{preds_dir} holds no .nii/.nii.gz predictions")
        pred = _pick(preds, case, preds_dir)
        root = Path(data) if data else _run_data_root(path)
        if root is None:
            raise FileNotFoundError(f"{path} is a run directory but its CT data is unknown: "
                                    "pass --data DIR (or put data.root in config.yaml)")
        m = _LITS.match(pred.name)
        stem = f"volume-{m.group(2)}" if m else _stem(pred)
        for vol, label in _dataset_cases(root).items():
            m2 = _LITS.match(vol.name)
            if _stem(vol) == stem or (m and m2 and int(m2.group(2)) == int(m.group(2))):
                found = _dataset_case(vol, label, run=path)
                return ViewedCase(found.name, found.volume, found.labels, pred)
        raise FileNotFoundError(f"no CT volume {stem}.nii[.gz] for {pred.name} in {root}")
    cases = _dataset_cases(path)
    if cases:
        image = _pick(list(cases), case, path)
        return _dataset_case(image, cases[image])
    raise FileNotFoundError(f"{path}: no LiTS volume-N.nii[.gz], MSD imagesTr/ or run "
                            "predictions/ found")


# --- arrays -> napari layer data ------------------------------------------------------------------

def to_display(volume: np.ndarray) -> np.ndarray:
    """RAS+ (X, Y, Z) -> napari (Z, Y, X), every axis reversed (a view, no copy)."""
    return np.asarray(volume)[::-1, ::-1, ::-1].transpose(2, 1, 0)


def from_display(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display`."""
    return np.asarray(data).transpose(2, 1, 0)[::-1, ::-1, ::-1]


def display_scale(spacing) -> tuple[float, float, float]:
    sx, sy, sz = (float(s) for s in spacing)
    return (sz, sy, sx)


def contrast_limits(volume) -> tuple[float, float]:
    """[-200, 300] HU, or its image in [0, 1] for an already windowed volume."""
    from hrseg.viz.figures import default_window
    return tuple(default_window(volume))


def _read(path: Path):
    from hrseg.data.dataset import read_nifti
    return read_nifti(path)


def _labels_layer(path: Path, spacing, role: str, name: str, shape=None):
    arr, _, sp = _read(path)
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{path.name}: shape {tuple(arr.shape)} != CT shape {tuple(shape)}")
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr)
    colours = LABEL_COLOURS if role == "labels" else PREDICTION_COLOURS
    kwargs = {"name": name, "scale": display_scale(spacing if spacing is not None else sp),
              "colormap": dict(colours), "opacity": 0.5,
              "metadata": {"hrseg": {"role": role, "path": str(path)}}}
    return to_display(arr.astype(np.uint8)), kwargs, "labels"


def case_layers(case: ViewedCase) -> list[tuple]:
    """napari LayerData tuples ``(data, kwargs, type)``: CT image, labels, prediction."""
    layers = []
    spacing = shape = None
    if case.volume is not None:
        vol, _, spacing = _read(case.volume)
        vol = np.asarray(vol)
        shape = vol.shape
        layers.append((to_display(vol), {
            "name": case.name, "scale": display_scale(spacing), "colormap": "gray",
            "contrast_limits": contrast_limits(vol),
            "metadata": {"hrseg": {"role": "ct", "path": str(case.volume),
                                   "spacing": tuple(float(s) for s in spacing)}}}, "image"))
    for path, role in ((case.labels, "labels"), (case.prediction, "prediction")):
        if path is not None:
            name = (_stem(path) if case.volume is None or _stem(path) != case.name
                    else f"{case.name} {role}")
            layers.append(_labels_layer(path, spacing, role, name, shape))
    return layers
