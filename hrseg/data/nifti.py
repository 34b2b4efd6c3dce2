"""NIfTI files: read in canonical orientation, write atomically, find LiTS / MSD / KiTS cases.

Arrays keep nibabel's (x, y, z) voxel order; :func:`read_nifti` reorients them to the closest
canonical orientation (RAS+: x to the patient's right, y anterior, z superior) by flips and
axis permutations only — no interpolation — so a CT stored LPS (most DICOM conversions, most
of LiTS) and one stored RAS give the same array.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrseg import atomic

NII = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
LITS_IMAGE = re.compile(r"^volume-(?P<n>\d+)\.nii(\.gz)?$")
LITS_LABEL = re.compile(r"^segmentation-(?P<n>\d+)\.nii(\.gz)?$")
KITS_CASE = re.compile(r"^case_\d+$")   # KiTS19: case_00000/imaging.nii.gz, segmentation.nii.gz


@dataclass(frozen=True)
class Case:
    """One case on disk: ``image`` and ``label`` paths (label None when it is missing)."""
    id: str
    image: Path
    label: Path | None


def read_errors() -> tuple[type[BaseException], ...]:
    """What nibabel raises for a bad header, a non-NIfTI or a truncated/corrupt file."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    return (OSError, EOFError, ValueError, zlib.error, struct.error, ImageFileError,
            HeaderDataError)


MAX_VOXELS_ENV = "HRSEG_MAX_VOXELS"
MAX_VOXELS = 2 ** 31        # 5x a 512³ volume with 3 classes; $HRSEG_MAX_VOXELS overrides
GZIP_MAX_RATIO = 1032       # deflate cannot expand a byte into more than this


def max_voxels() -> int:
    try:
        return int(float(os.environ.get(MAX_VOXELS_ENV) or MAX_VOXELS))
    except ValueError:
        raise ValueError(f"${MAX_VOXELS_ENV}={os.environ[MAX_VOXELS_ENV]!r}: not a number "
                         f"of voxels") from None


def check_header(img, path) -> None:
    """Refuse, before any array is allocated, a header that declares more voxels than
    :func:`max_voxels` or more data than the file can hold (a 72-byte .nii.gz that says
    1500³): ValueError naming the file."""
    path = Path(path)
    dims = [int(s) for s in img.shape]
    if any(s < 1 for s in dims):
        raise ValueError(f"{path}: header declares an empty shape {tuple(dims)}")
    voxels, limit = math.prod(dims), max_voxels()
    if voxels > limit:
        raise ValueError(f"{path}: header declares {'×'.join(map(str, dims))} = {voxels:.3g} "
                         f"voxels, more than the limit {limit:.3g} (set ${MAX_VOXELS_ENV} "
                         f"to raise it)")
    need = voxels * img.get_data_dtype().itemsize
    size = path.stat().st_size
    gz = path.name.endswith(".gz")
    offset = 0 if gz else int(getattr(img.header, "get_data_offset", lambda: 0)() or 0)
    if (gz and need > size * GZIP_MAX_RATIO + (1 << 16)) or (not gz and need + offset > size
                                                                and path.suffix == ".nii"):
        raise ValueError(f"{path}: header declares {'×'.join(map(str, dims))} voxels "
                         f"({need} bytes) but the file has {size} bytes: truncated or not "
                         f"what it says")


def _load(path):
    import nibabel as nib
    try:
        img = nib.load(str(path))
    except read_errors() as e:
        raise ValueError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    check_header(img, path)
    return img


def spatial_shape(img) -> tuple[int, ...]:
    """The 3 spatial sizes (trailing singleton dimensions, e.g. (X, Y, Z, 1), dropped)."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def orientation(affine) -> np.ndarray:
    """nibabel's ornt array: for each stored axis, the RAS axis it is closest to and its sign."""
    import nibabel as nib
    return nib.orientations.io_orientation(np.asarray(affine, np.float64))


def to_canonical(array: np.ndarray, affine) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` in the closest canonical orientation (views: flips/transposes)."""
    import nibabel as nib
    ornt = orientation(affine)
    out = nib.orientations.apply_orientation(array, ornt)
    new_affine = np.asarray(affine, np.float64) @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return out, new_affine


def from_canonical(array: np.ndarray, affine) -> np.ndarray:
    """Inverse of :func:`to_canonical`: a canonical array back in the stored voxel order of a
    file with ``affine``."""
    import nibabel as nib
    ornt = orientation(affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    return nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(ras, ornt))


def spacing_of(affine) -> np.ndarray:
    """Voxel size (mm) along each array axis: the affine's column norms."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def read_nifti(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(array, affine, spacing)`` of a NIfTI file, reoriented to canonical RAS+.

    The array keeps the file's integer type when it has no scaling (CT HU as int16, labels
    as uint8); float data comes back as float32. ``spacing`` (3,) is in mm along the
    returned axes. A missing, truncated or non-NIfTI file raises ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    img = _load(path)
    checked_spacing(img.affine, path)
    shape = spatial_shape(img)
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except read_errors() as e:
        raise ValueError(f"{path}: truncated or unreadable image data "
                         f"({type(e).__name__}: {e})") from None
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    array, affine = to_canonical(data, img.affine)
    return array, affine, checked_spacing(affine, path)


def checked_spacing(affine, path) -> np.ndarray:
    """:func:`spacing_of`, or ValueError naming the file when a voxel size is zero or not
    finite (a damaged affine: nothing can be resampled from it)."""
    spacing = spacing_of(affine)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ValueError(f"{path}: the affine gives voxel sizes "
                         f"{np.round(spacing, 4).tolist()} mm; every one must be > 0 and finite")
    return spacing


def write_nifti(path, array: np.ndarray, affine, dtype=None) -> Path:
    """Write ``array`` with ``affine`` (sform and qform, mm) atomically (hrseg.atomic)."""
    import nibabel as nib
    path = Path(path)
    array = np.asarray(array)
    img = nib.Nifti1Image(array.astype(dtype) if dtype is not None else array,
                          np.asarray(affine, np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    with atomic.temp_path(path) as tmp:        # a dot file: find_cases skips it
        nib.save(img, str(tmp))
    return path


def _visible(p: Path) -> bool:
    # Dot files: our temporaries, and the macOS "._liver_0.nii.gz" forks inside the MSD tar.
    return not p.name.startswith(".")


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def walk(root: Path, pattern: str) -> list[Path]:
    """``root.rglob(pattern)``, following symlinked sub-folders (a dataset assembled from
    links) once each: a link back up the tree is not a loop."""
    import fnmatch
    out, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        out += [Path(folder) / f for f in sorted(files) if fnmatch.fnmatch(f, pattern)]
    return out


def detect_layout(root: Path) -> str | None:
    """``"msd"`` (imagesTr/ or dataset.json), ``"kits"`` (case_N/ folders with imaging or
    segmentation files), ``"lits"`` (volume-N files), else None."""
    if (root / "imagesTr").is_dir() or (root / "dataset.json").is_file():
        return "msd"
    if any(_kits_files(d) != (None, None) for d in _kits_dirs(root)):
        return "kits"
    if any(_visible(p) for p in walk(root, "volume-*.nii*")):
        return "lits"
    return None


def _lits(root: Path) -> tuple[list[Case], list[Path]]:
    images, labels = {}, {}
    for p in filter(_visible, walk(root, "*.nii*")):
        for pattern, table in ((LITS_IMAGE, images), (LITS_LABEL, labels)):
            m = pattern.match(p.name)
            if m:
                table.setdefault(str(int(m["n"])), []).append(p)
    cases = []
    for n in sorted(images, key=int):
        lab = labels.get(n)
        cases.append(Case(n, min(images[n]), min(lab) if lab else None))
    orphans = [min(labels[n]) for n in sorted(labels, key=int) if n not in images]
    return cases, orphans


def _msd(root: Path) -> tuple[list[Case], list[Path]]:
    listing = root / "dataset.json"
    if listing.is_file():
        try:
            entries = json.loads(listing.read_text()).get("training", [])
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{listing}: not a valid MSD dataset.json ({e})") from None
        cases = []
        for e in entries:
            image = root / e["image"]
            cases.append(Case(NII.match(image.name)["stem"], image,
                              root / e["label"] if e.get("label") else None))
        return sorted(cases, key=lambda c: _natural(c.id)), []
    images = sorted(filter(_visible, (root / "imagesTr").glob("*.nii*")))
    labels = {p.name: p for p in filter(_visible, (root / "labelsTr").glob("*.nii*"))}
    cases = [Case(NII.match(p.name)["stem"], p, labels.get(p.name)) for p in images
             if NII.match(p.name)]
    names = {p.name for p in images}
    orphans = [p for n, p in sorted(labels.items()) if n not in names]
    return sorted(cases, key=lambda c: _natural(c.id)), orphans


def _kits_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.glob("case_*") if KITS_CASE.match(d.name) and d.is_dir()),
                  key=lambda d: _natural(d.name))


def _kits_files(case_dir: Path) -> tuple[Path | None, Path | None]:
    """``(imaging, segmentation)`` of a KiTS19 case folder (``.nii.gz`` before ``.nii``)."""
    def first(stem):
        return next((p for p in (case_dir / f"{stem}.nii.gz", case_dir / f"{stem}.nii")
                     if p.is_file()), None)
    return first("imaging"), first("segmentation")


def _kits(root: Path) -> tuple[list[Case], list[Path]]:
    cases, orphans = [], []
    for d in _kits_dirs(root):
        image, label = _kits_files(d)
        if image is not None:
            cases.append(Case(d.name, image, label))
        elif label is not None:
            orphans.append(label)
    return cases, orphans


def scan(root, layout: str = "auto") -> tuple[list[Case], list[Path]]:
    """``(cases, orphan label files)`` of a dataset folder; ValueError if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory (a synthetic dataset: "
                         f"`hrseg phantom --out {root}`)")
    if layout not in ("auto", "lits", "msd", "kits"):
        raise ValueError(f"data.layout '{layout}' is not one of auto, lits, msd, kits")
    found = detect_layout(root) if layout == "auto" else layout
    if found is None:
        raise ValueError(f"{root}: empty dataset directory (no LiTS volume-N.nii[.gz] files, "
                         f"no MSD imagesTr/ and no KiTS case_N/imaging.nii.gz; write one with "
                         f"`hrseg phantom --out {root}`)")
    cases, orphans = {"lits": _lits, "msd": _msd, "kits": _kits}[found](root)
    if not cases and not orphans:
        raise ValueError(f"{root}: no {found.upper()} cases found")
    return cases, orphans


def find_cases(root, layout: str = "auto") -> list[Case]:
    """The cases of a LiTS (``volume-N`` / ``segmentation-N``, in any sub-folder), MSD
    (``imagesTr/``, ``labelsTr/``, ``dataset.json``) or KiTS19 (``case_XXXXX/imaging.nii.gz``
    and ``segmentation.nii.gz``; the case id is the folder name) dataset, in natural order."""
    return scan(root, layout)[0]
