"""The KiTS19 phantom (``hrseg phantom --task kits``): the same synthetic abdomen, labelled as
KiTS19 labels it — kidney 1, kidney tumour 2, everything else (the liver too) 0 — with 1–2
renal tumours, in KiTS19's file layout and orientation.

The abdomen, its noise, blur and geometry are hrseg.data.phantom's (``generate_case(seed,
shape, task="kits")``); this module adds only what differs:

* :func:`scan_start` moves the scan down where the kidneys reach below it;
  :func:`sample_kidney_tumours` draws the tumours after the liver contents (every KiTS19
  training case has one; 20 % of phantom cases get a second): radius log-uniform 8–35 mm,
  centred 40–90 % of the way from a kidney's centre to its surface (so larger ones bulge out of
  the kidney, exophytic, as renal cell carcinomas often do), 40–100 HU darker than the
  enhancing kidney, with a necrotic core when large.
* :func:`paint` paints the abdomen (painter.paint), paints the kidneys again over the liver's
  lower tip (which the LiTS phantom lets cover the right kidney), labels them exactly where
  painter painted them (painter.organ_region, without the renal sinus) and paints the tumours
  over kidney and perirenal fat (never into the liver).
* :func:`to_kits_storage` writes the arrays as KiTS19's files store them: slices on axis 0,
  ``(z, y, x)``, every axis reversed, an affine with zeros on its diagonal
  (``[[0, 0, -sx], [0, -sy, 0], [-sz, 0, 0]]``), so the loader's reorientation is exercised.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hrseg.data import nifti, painter
from hrseg.data.anatomy import F32, Anatomy

IMAGE, LABEL = "imaging.nii.gz", "segmentation.nii.gz"


def case_dir(out, index: int) -> Path:
    """KiTS19's folder name of case ``index``: ``case_00000``."""
    return Path(out) / f"case_{int(index):05d}"


def scan_start(a: Anatomy, margin: float = 10.0) -> float:
    """The z (mm) of the scan's first slice: 0, or lower, so that both kidneys are in view
    (a KiTS19 scan always covers them; the abdomen's kidneys can reach below z = 0)."""
    return min(0.0, min(float(k.c[2] - k.r[2]) for k in a.kidneys) - margin)


def sample_kidney_tumours(a: Anatomy, rng: np.random.Generator) -> None:
    """``a.kidney_tumours``: 1 (80 %) or 2 tumours, see the module docstring."""
    tumours = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        k = a.kidneys[int(rng.integers(2))]
        for _ in range(50):          # a centre inside the abdominal cavity (as the kidney)
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            centre = k.c + direction * k.r * float(rng.uniform(0.4, 0.9))   # (x, y, z) mm
            if a.cavity(*(np.array([v], F32) for v in centre)).item():
                break
        r = math.exp(rng.uniform(math.log(8.0), math.log(35.0)))
        tumours.append({"centre": centre.astype(F32), "r": r,
                        "axes": rng.uniform(0.8, 1.0, 3).astype(F32),
                        "hu": a.hu_kidney - float(rng.uniform(40, 100)),
                        "core": float(rng.uniform(20, 50)) if r > 20 else 0.0})
    a.kidney_tumours = tumours


def _paint_tumour(a: Anatomy, b: painter.Block, t: dict, liver: np.ndarray) -> None:
    r = t["r"] * t["axes"]
    sl = b.box(t["centre"] - r, t["centre"] + r)
    if sl is None:
        return
    x, y, z = b.coords(sl)
    c = t["centre"]
    q = (((x - c[0]) / r[0]) ** 2)[:, None, None] + (((y - c[1]) / r[1]) ** 2)[None, :, None] \
        + (((z - c[2]) / r[2]) ** 2)[None, None, :]
    q = q + 0.15 * a.f_tex(x, y, z)                      # a slightly irregular outline
    inside = (q < 1) & a.cavity(x, y, z) & ~liver[sl]
    np.copyto(b.hu[sl], np.where(q < 0.35, F32(t["hu"] - t["core"]), F32(t["hu"])),
              where=inside)
    b.lab[sl][inside] = 2


def paint(a: Anatomy, xs, ys, zs) -> painter.Block:
    """The abdomen at the voxel centres ``xs × ys × zs`` with KiTS19 labels (0/1/2)."""
    b = painter.paint(a, xs, ys, zs)
    painter.paint_kidneys(a, b)                          # again: over the liver's lower tip
    liver = b.lab >= 1
    b.lab[...] = 0
    for k in a.kidneys:
        sl, _, inside = painter.organ_region(a, b, k, painter.KIDNEY_AMP)
        if sl is None:
            continue
        b.lab[sl][inside & (painter.renal_sinus(k).q(*b.coords(sl)) >= 1)] = 1
        liver[sl] &= ~inside
    for t in getattr(a, "kidney_tumours", ()):
        _paint_tumour(a, b, t, liver)
    return b


def to_kits_storage(array: np.ndarray, affine) -> tuple[np.ndarray, np.ndarray]:
    """An array stored with ``affine`` -> ``(array, affine)`` stored as KiTS19 stores it (the
    same voxels at the same world positions; see the module docstring)."""
    ras, ras_affine = nifti.to_canonical(np.asarray(array), affine)
    spacing = nifti.spacing_of(ras_affine)
    kits = np.zeros((4, 4))
    kits[0, 2], kits[1, 1], kits[2, 0], kits[3, 3] = -spacing[0], -spacing[1], -spacing[2], 1
    # stored voxel (a, b, c) = canonical (nx-1-c, ny-1-b, nz-1-a): the same world position
    kits[:3, 3] = ras_affine[:3, 3] + spacing * (np.array(ras.shape) - 1)
    return np.ascontiguousarray(nifti.from_canonical(ras, kits)), kits


def write_case(out, index: int, hu: np.ndarray, label: np.ndarray, affine) -> list[Path]:
    """Write one generated case as ``case_XXXXX/imaging.nii.gz`` (int16 HU) and
    ``segmentation.nii.gz`` (uint8) in KiTS19's storage order."""
    d = case_dir(out, index)
    hu_k, kits_affine = to_kits_storage(hu, affine)
    lab_k, _ = to_kits_storage(label, affine)
    nifti.write_nifti(d / IMAGE, hu_k, kits_affine, np.int16)
    nifti.write_nifti(d / LABEL, lab_k, kits_affine, np.uint8)
    return [d / IMAGE, d / LABEL]
