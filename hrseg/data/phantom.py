"""Synthetic abdominal CT with liver and tumour labels — the dataset a fresh machine trains on.

``generate_case(seed)`` draws one abdomen (hrseg.data.anatomy; hrseg.data.painter paints it): body
wall, fat, bowel loops and gas, spine and ribs, aorta and IVC, kidneys, spleen, stomach, lung
bases and heart above the diaphragm, an irregular lobed liver with vessels and sometimes a
gallbladder, and 0–10 hypodense tumours of 2–40 mm radius. It renders it like a CT scanner:
512×512 axial slices at 0.68–0.86 mm, 1–2.5 mm slices (80–200 of them), correlated noise, a
slight blur, integer HU. Small tumours are a few voxels wide at full resolution and vanish at
low resolution — what the resolution study needs to show: over 24 cases, 16 % of the tumours
have no voxel left at 64³ and 33 % at 32³ (benchmarks/phantom_stats.py).

``write_dataset`` writes cases in the LiTS layout (``volume-N.nii.gz``, ``segmentation-N.nii.gz``;
int16 HU and uint8 labels, a scanner affine; most cases stored LPS like DICOM conversions, some
RAS or feet-first) so loading goes through exactly the same ``hrseg.data`` path as LiTS.
``task="kits"``: kidney / kidney-tumour labels and the KiTS19 layout (hrseg.data.kits_phantom).
Everything is a function of the seed: the same seed gives the same files on the same platform.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from hrseg import atomic
from hrseg.data import anatomy, kits_phantom, nifti, painter

VERSION = 1                 # bump when the generator changes: stale datasets get rewritten
IN_PLANE = 512              # voxels per axial row/column at the default shape
SLAB = 16                   # x-rows painted at a time (temporaries stay in cache)
_BLUR = np.array([0.25, 0.5, 0.25], np.float32)   # binomial PSF per axis (sigma 0.7 voxel)
_NOISE_GAIN = 1 / 0.375 ** 1.5                    # white-noise sd lost by the 3-axis blur
# File orientations: (flip x, flip y, flip z) of the stored array relative to RAS, weights.
_ORIENTATIONS = (((True, True, False), 0.7), ((False, False, False), 0.2),
                 ((True, True, True), 0.1))
TASKS = ("lits", "kits")    # lits: liver 1 / tumour 2; kits: kidney 1 / tumour 2 (kits_phantom)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of the dataset with seed ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _geometry(rng: np.random.Generator, shape):
    """Field of view (mm), z extent (mm), voxel shape, spacing and stored orientation."""
    sp = rng.uniform(0.68, 0.86)
    thick = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5]))
    nz = int(np.clip(round(rng.uniform(180, 260) / thick), 80, 200))
    fov = (IN_PLANE * sp, IN_PLANE * sp)
    extent = nz * thick
    flips = _ORIENTATIONS[rng.choice(len(_ORIENTATIONS), p=[w for _, w in _ORIENTATIONS])][0]
    if shape is None:
        shape = (IN_PLANE, IN_PLANE, nz)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"phantom shape must be 3 sizes >= 4 (x y z voxels), got {shape}")
    spacing = (fov[0] / shape[0], fov[1] / shape[1], extent / shape[2])
    return fov, extent, shape, spacing, flips


def slice_counts(cases: int, seed: int = 0) -> list[int]:
    """The slice count (80–200) of each case of the default-shape dataset ``seed``, without
    rendering anything: the first draws of :func:`generate_case`."""
    return [_geometry(np.random.default_rng(case_seed(seed, i)), None)[2][2]
            for i in range(int(cases))]


def _centres(n: int, step: float, lo: float) -> np.ndarray:
    return (lo + (np.arange(n) + 0.5) * step).astype(np.float32)


def _blur_yz_inplace(a: np.ndarray) -> None:
    for ax in (1, 2):
        if a.shape[ax] > 1:
            ndimage.correlate1d(a, _BLUR, axis=ax, output=a, mode="nearest")


def _blur_x_inplace(a: np.ndarray) -> None:
    """Binomial blur along axis 0, one row at a time (no full-volume temporary)."""
    if a.shape[0] < 2:
        return
    prev = a[0].copy()
    for i in range(a.shape[0]):
        cur = a[i].copy()
        nxt = a[i + 1] if i + 1 < a.shape[0] else cur
        np.multiply(cur, 0.5, out=a[i])
        a[i] += 0.25 * prev
        a[i] += 0.25 * nxt
        prev = cur


def _draw(seed: int, shape, task: str = "lits"):
    """Every random draw of a case but the noise: ``(body, shape, spacing, flips, xs, ys, zs,
    noise_seed, affine)`` (voxel centres in the anatomy's mm; the affine of the stored array)."""
    if task not in TASKS:
        raise ValueError(f"phantom: --task must be one of {', '.join(TASKS)}, got '{task}'")
    rng = np.random.default_rng(int(seed))
    fov, extent, shape, spacing, flips = _geometry(rng, shape)
    body = anatomy.Anatomy(rng, fov, extent)
    anatomy.sample_liver_contents(body, rng)
    if task == "kits":
        kits_phantom.sample_kidney_tumours(body, rng)
    xs = _centres(shape[0], spacing[0], -fov[0] / 2)
    ys = _centres(shape[1], spacing[1], -fov[1] / 2)
    zs = _centres(shape[2], spacing[2], kits_phantom.scan_start(body) if task == "kits" else 0.0)
    noise_seed = int(rng.integers(2 ** 63))
    z0 = -float(rng.uniform(200, 500))          # table position: an arbitrary world offset
    lo = np.array([xs[0], ys[0], zs[0] + z0], np.float64)
    hi = np.array([xs[-1], ys[-1], zs[-1] + z0], np.float64)
    affine = np.eye(4)
    for d, flip in enumerate(flips):
        affine[d, d] = -spacing[d] if flip else spacing[d]
        affine[d, 3] = hi[d] if flip else lo[d]
    return body, shape, spacing, flips, xs, ys, zs, noise_seed, affine


def case_tumours(seed: int, shape=None) -> list[dict]:
    """The ground truth of :func:`generate_case`'s liver tumours (``seed``, ``shape`` as
    there; the LiTS task), without rendering: per tumour ``centre_mm`` (RAS+, the affine's
    world), ``centre_voxel`` (index in the stored array), ``radius_mm`` (the drawn r),
    ``semi_axes_mm`` (r × the ellipsoid's axes, before the lobe modulation and the clipping to
    the liver) and ``diameter_mm``: the equivalent diameter of that ellipsoid,
    ``2 (a b c)^(1/3)``. Tumours may overlap (then they are one lesion of the label)."""
    body, shape, spacing, flips, xs, ys, zs, _, affine = _draw(seed, shape)
    out = []
    for t in body.tumours:
        c = np.asarray(t["centre"], np.float64)                      # the anatomy's mm
        index = [(c[d] - first) / spacing[d] for d, first in enumerate((xs[0], ys[0], zs[0]))]
        index = [shape[d] - 1 - i if flips[d] else i for d, i in enumerate(index)]
        semi = [float(t["r"] * a) for a in t["axes"]]
        out.append({"centre_mm": (affine @ np.array([*index, 1.0]))[:3].tolist(),
                    "centre_voxel": [float(i) for i in index], "radius_mm": float(t["r"]),
                    "semi_axes_mm": semi, "diameter_mm": 2.0 * math.prod(semi) ** (1 / 3)})
    return out


def generate_case(seed: int, shape=None, task: str = "lits"):
    """One synthetic CT: ``(hu float32 (X,Y,Z), label uint8 (X,Y,Z), affine (4,4))``.

    Arrays are in the stored voxel order (as nibabel gives them from the written file; the
    affine says how they map to RAS+ mm). ``shape=None`` is the realistic default
    (512×512×80–200); any other shape renders the same anatomy on that grid (spacing =
    field of view / shape), e.g. ``(64, 64, 32)`` for tests. HU values are integers.
    ``task="kits"``: with renal tumours, labelled kidney 1 / tumour 2 (kits_phantom).
    :func:`case_tumours` gives the LiTS task's tumour centres and sizes.
    """
    body, shape, _, flips, xs, ys, zs, noise_seed, affine = _draw(seed, shape, task)
    paint = kits_phantom.paint if task == "kits" else painter.paint
    hu = np.empty(shape, np.float32)
    label = np.empty(shape, np.uint8)
    half_width = math.sqrt(3) * body.noise_sd * _NOISE_GAIN   # uniform noise of that sd
    # The stored orientation: flipped axes are written reversed, slab by slab.
    flip_yz = (slice(None), slice(None, None, -1) if flips[1] else slice(None),
               slice(None, None, -1) if flips[2] else slice(None))
    for k, i0 in enumerate(range(0, shape[0], SLAB)):
        i1 = min(i0 + SLAB, shape[0])
        blk = paint(body, xs[i0:i1], ys, zs)
        noise = np.random.default_rng([noise_seed, k]).random(blk.hu.shape, np.float32)
        noise -= 0.5
        noise *= 2 * half_width
        blk.hu += noise
        _blur_yz_inplace(blk.hu)
        rows = slice(shape[0] - i1, shape[0] - i0) if flips[0] else slice(i0, i1)
        xf = slice(None, None, -1) if flips[0] else slice(None)
        hu[rows] = blk.hu[xf][flip_yz]
        label[rows] = blk.lab[xf][flip_yz]
    _blur_x_inplace(hu)
    np.clip(hu, -1024, 3071, out=hu)
    np.rint(hu, out=hu)
    return hu, label, affine


def case_paths(out: Path, index: int, task: str = "lits") -> list[Path]:
    """``[image, label]`` of case ``index``: LiTS ``volume-N`` / ``segmentation-N``, KiTS19
    ``case_XXXXX/imaging.nii.gz`` / ``segmentation.nii.gz``."""
    if task == "kits":
        return [kits_phantom.case_dir(out, index) / n for n in (kits_phantom.IMAGE,
                                                                 kits_phantom.LABEL)]
    return [out / f"volume-{index}.nii.gz", out / f"segmentation-{index}.nii.gz"]


def _write_case(out: Path, index: int, seed: int, shape, task: str = "lits") -> list[Path]:
    hu, label, affine = generate_case(case_seed(seed, index), shape, task)
    if task == "kits":
        return kits_phantom.write_case(out, index, hu, label, affine)
    paths = case_paths(out, index)
    nifti.write_nifti(paths[0], hu, affine, np.int16)
    nifti.write_nifti(paths[1], label, affine, np.uint8)
    return paths


MANIFEST = "phantom.json"
MAX_SIZE = 2048             # voxels per axis a phantom may have (512 is the realistic size)
MAX_CASES = 10000


class PhantomMismatch(ValueError):
    """A folder holds another phantom than the one asked for, or data that is not ours."""


def request(cases, seed, shape, task: str = "lits") -> dict:
    """The validated request (everything checked before any file is touched)."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got '{task}'")
    try:
        cases, seed = int(cases), int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"--cases and --seed must be integers, got {cases!r}, "
                         f"{seed!r}") from None
    if not 1 <= cases <= MAX_CASES:
        raise ValueError(f"--cases must be in 1..{MAX_CASES}, got {cases}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if shape is not None:
        shape = [int(s) for s in shape]
        if len(shape) != 3 or not all(4 <= s <= MAX_SIZE for s in shape):
            raise ValueError(f"--shape must be 3 sizes in 4..{MAX_SIZE} (x y z "
                             f"voxels), got {' '.join(map(str, shape))}")
    return {"generator": VERSION, "seed": seed, "cases": cases, "shape": shape,
            **({"task": task} if task != "lits" else {})}


def describe(m: dict) -> str:
    shape = m.get("shape")
    return (f"{m.get('cases')} cases, seed {m.get('seed')}, shape "
            f"{' '.join(map(str, shape)) if shape else 'full size'}")


def case_files(cases: int, task: str = "lits") -> list[str]:
    """The files a phantom writes, relative to its folder (LiTS: with ``tumours.json``)."""
    out = Path(".")
    files = [str(f) for i in range(int(cases)) for f in case_paths(out, i, task)]
    return files if task == "kits" else files + [TUMOURS]


def read_manifest(out) -> dict | None:
    """The ``phantom.json`` of a folder (None if there is none); a damaged one is ValueError."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004
        m.setdefault("files", case_files(int(m["cases"]), m.get("task", "lits"))
                     [:2 * int(m["cases"])])   # written before files were listed
        return m
    except (ValueError, KeyError, TypeError) as e:
        raise PhantomMismatch(f"{path}: not a phantom manifest ({e}); this folder is left "
                              f"untouched: choose another --out") from None


def check_folder(out, want: dict) -> tuple[bool, list[str]]:
    """``(up to date, files to write)`` for writing ``want`` into ``out``; PhantomMismatch when
    the folder holds anything that is not this phantom's own output."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhantomMismatch(f"{out}: exists and is not a folder")
    files = case_files(want["cases"], want.get("task", "lits"))
    if not out.exists():
        return False, files
    old = read_manifest(out)
    ours = {Path(f).parts[0] for f in old["files"]} if old else set()   # case_XXXXX/ folders
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in ours and p.name != MANIFEST
                     and not p.name.startswith(".tmp-"))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise PhantomMismatch(f"{out}: holds files a phantom did not write ({shown}); a "
                              f"phantom is written only into an empty folder or over its own "
                              f"earlier output: choose another --out")
    if old is None:
        return False, files
    same = {k: old.get(k) for k in ("seed", "cases", "shape", "task")} == \
        {k: want.get(k) for k in ("seed", "cases", "shape", "task")}
    if not same:
        raise PhantomMismatch(f"{out}: holds a phantom of {describe(old)} ({MANIFEST}), "
                              f"this asks for {describe(want)}; use another --out, or the "
                              f"same arguments")
    done = old.get("generator") == VERSION and old.get("complete", True)
    return done and all((out / f).is_file() for f in files), files


TUMOURS = "tumours.json"    # {case index: case_tumours(...)}: the ground truth of the lesions


def _write_tumours(out: Path, cases: int, seed: int, shape) -> None:
    truth = {str(i): case_tumours(case_seed(seed, i), shape) for i in range(cases)}
    atomic.write_text(out / TUMOURS, json.dumps(truth, indent=1) + "\n")


def write_dataset(out_dir, cases: int, seed: int = 0, shape=None, progress: bool = False,
                  workers: int | None = None, task: str = "lits") -> list[Path]:
    """Write ``cases`` synthetic CTs to ``out_dir`` in the LiTS layout (``task="kits"``: the
    KiTS19 layout, see case_paths); returns the paths. For the LiTS task ``tumours.json``
    beside them records each case's tumours (:func:`case_tumours`).

    Case N is ``generate_case(case_seed(seed, N), shape)``. Every argument is checked before
    anything is touched. Only an empty (or missing) folder, or one holding this phantom's own
    earlier output (``phantom.json`` records the request and the files written), is written:
    a folder with any other file, or with a phantom of other cases / seed / shape, is a
    :class:`PhantomMismatch` naming both, and nothing is deleted. The same request again is
    left as it is (an interrupted or older-generator one is completed / rewritten: only the
    files it lists). Files are written atomically (temporary name, then rename).
    ``workers`` threads (default: the CPU count, at most 4) render cases in parallel.
    """
    out = Path(out_dir)
    want = request(cases, seed, shape, task)
    up_to_date, files = check_folder(out, want)
    expected = [out / f for f in files if f != TUMOURS]
    if up_to_date:
        if progress:
            print(f"{out}: phantom dataset up to date ({describe(want)})")
        return expected
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    # listed before they exist: an interrupted write is completed by the same request
    atomic.write_text(manifest, json.dumps({**want, "files": files, "complete": False},
                                           indent=1) + "\n")
    cases, shape = want["cases"], tuple(want["shape"]) if want["shape"] else None
    workers = workers or min(4, os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # notebook-aware bars in JupyterLab
        bar = tqdm(total=cases, desc=f"phantom -> {out}", unit="case")
    with ThreadPoolExecutor(max(1, min(workers, cases))) as pool:
        for _ in pool.map(lambda i: _write_case(out, i, want["seed"], shape, task),
                          range(cases)):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if task == "lits":
        _write_tumours(out, cases, want["seed"], shape)
    atomic.write_text(manifest, json.dumps({**want, "files": files, "complete": True},
                                           indent=1) + "\n")
    return expected
