"""Lesions one by one, as LiTS reports them: found or missed, by size.

A *lesion* is a connected component of the reference tumour mask under 26-connectivity (two
voxels touching by a corner are one lesion). Each is matched to the prediction's tumour
components (26-connectivity too):

* its prediction ``P_i``: the predicted components that overlap it, less the voxels of the
  *other* reference lesions (a predicted blob spanning two lesions is not counted against
  either for the other's voxels);
* its Dice: ``2 |P_i ∩ T_i| / (|P_i| + |T_i|)`` (0.0 when nothing overlaps);
* detected, by one of two rules (``rule=``):

  - ``"overlap"`` (the default, LiTS's lesion-wise recall): any predicted voxel on it;
  - ``"dice"``: its Dice ≥ ``threshold`` (0.5).

  The default is "overlap" because the question this module answers is whether a lesion is
  *found at all* at a given network resolution (small tumours vanish when the volume is
  down-sampled); how well a found lesion is outlined is the per-lesion Dice, reported beside
  it. Every record keeps its Dice and overlap, so :func:`summarize` can re-apply either rule.

* its size: volume in mm³ from the voxel spacing, and the equivalent diameter — the diameter
  of the sphere of equal volume, ``(6 V / π)^(1/3)`` mm.

False positives: predicted components that touch no reference lesion. :func:`summarize` pools
cases into diameter bins (``BINS_MM``: < 10, 10–20, 20–40, ≥ 40 mm): lesions, detection rate
and mean Dice per bin, and false positives per case.

Everything is on the arrays given: hrseg.train.inference evaluates on each case's original
voxel grid (the reference label as stored, the prediction resampled back to it).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

RULES = ("overlap", "dice")
DEFAULT_RULE = "overlap"
DICE_THRESHOLD = 0.5
BINS_MM = (10.0, 20.0, 40.0)        # equivalent-diameter edges: < 10, 10–20, 20–40, ≥ 40 mm
_S26 = np.ones((3, 3, 3), bool)


def components(mask) -> tuple[np.ndarray, int]:
    """``(labels int32 (same shape), count)``: 26-connected components of a boolean 3D mask."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 3:
        raise ValueError(f"lesions: expected a 3D mask, got shape {mask.shape}")
    lab, n = ndimage.label(mask, structure=_S26)
    return lab.astype(np.int32, copy=False), int(n)


def bbox(mask) -> tuple[np.ndarray, np.ndarray] | None:
    """``(lo, hi)`` index box (hi exclusive) of a mask's True voxels; None when it has none."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    lo, hi = [], []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return np.array(lo), np.array(hi)


def equivalent_diameter(volume_mm3):
    """Diameter (mm) of the sphere of volume ``volume_mm3``: ``(6 V / π)^(1/3)``."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, np.float64) / math.pi)


def _check_rule(rule: str, threshold: float) -> None:
    if rule not in RULES:
        raise ValueError(f"lesions: detection rule '{rule}' is not one of {', '.join(RULES)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"lesions: Dice threshold must be in (0, 1], got {threshold}")


def is_detected(lesion: dict, rule: str = DEFAULT_RULE, threshold: float = DICE_THRESHOLD):
    """Whether a lesion record counts as detected under ``rule``."""
    _check_rule(rule, threshold)
    return lesion["overlap_voxels"] > 0 if rule == "overlap" else lesion["dice"] >= threshold


def analyse(pred, true, spacing, rule: str = DEFAULT_RULE, threshold: float = DICE_THRESHOLD,
            origin=(0, 0, 0), true_components: tuple[np.ndarray, int] | None = None) -> dict:
    """Per-lesion scores of one case: boolean tumour masks ``pred`` and ``true`` (same 3D
    shape, one grid), ``spacing`` (3,) mm per voxel along the array axes.
    ``true_components``: ``components(true)`` when the caller has it already (the reference
    is the same at every evaluation).

    Returns ``{"lesions": [...], "false_positives": k, "predicted_lesions": m}``; each lesion
    (in component order: ``scipy.ndimage.label``'s scan order) is ``{"voxels", "volume_mm3",
    "diameter_mm", "centre_voxel" (centroid + origin, in the array's index space),
    "overlap_voxels", "dice", "detected"}``.
    """
    _check_rule(rule, threshold)
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"lesions: prediction {pred.shape} and label {true.shape} differ")
    spacing = np.asarray(spacing, np.float64).reshape(3)
    t_lab, nt = components(true) if true_components is None else true_components
    if t_lab.shape != true.shape:
        raise ValueError(f"lesions: components {t_lab.shape} of another shape than {true.shape}")
    p_lab, npred = components(pred)
    t_size = np.bincount(t_lab[true], minlength=nt + 1)[1:]              # (nt,)
    p_size = np.bincount(p_lab[pred], minlength=npred + 1)               # (npred + 1,)
    both = true & pred
    ti, pj = t_lab[both].astype(np.int64), p_lab[both].astype(np.int64)
    pairs, ov = np.unique(ti * (npred + 1) + pj, return_counts=True)      # overlapping pairs
    ti, pj = pairs // (npred + 1) - 1, pairs % (npred + 1)                # lesion index, comp
    on_tumour = np.bincount(pj, weights=ov, minlength=npred + 1)          # |P_j ∩ any T|
    inter = np.bincount(ti, weights=ov, minlength=nt)                      # |P_i ∩ T_i|
    # |P_i| = Σ_j∈J_i (|P_j| - |P_j ∩ all T| + |P_j ∩ T_i|): other lesions' voxels left out
    p_i = np.bincount(ti, weights=p_size[pj] - on_tumour[pj] + ov, minlength=nt)
    dice = np.where(inter > 0, 2 * inter / np.maximum(p_i + t_size, 1), 0.0)
    volume = t_size * float(np.prod(spacing))
    diameter = equivalent_diameter(volume)
    centre = _centroids(t_lab, true, nt, t_size) + np.asarray(origin, np.float64)
    lesions = []
    for i in range(nt):
        rec = {"voxels": int(t_size[i]), "volume_mm3": round(float(volume[i]), 3),
               "diameter_mm": round(float(diameter[i]), 3),
               "centre_voxel": [round(float(c), 2) for c in centre[i]],
               "overlap_voxels": int(inter[i]), "dice": round(float(dice[i]), 6)}
        rec["detected"] = bool(is_detected(rec, rule, threshold))
        lesions.append(rec)
    touched = np.unique(pj).size
    return {"lesions": lesions, "false_positives": int(npred - touched),
            "predicted_lesions": npred}


def _centroids(lab: np.ndarray, mask: np.ndarray, n: int, size: np.ndarray) -> np.ndarray:
    """``(n, 3)`` mean voxel index of each component 1..n of ``lab`` (nonzero on ``mask``)."""
    if n == 0:
        return np.zeros((0, 3))
    idx = np.nonzero(mask)
    which = lab[idx]
    return np.stack([np.bincount(which, weights=i.astype(np.float64), minlength=n + 1)[1:]
                     / size for i in idx], axis=1)


def bin_labels(edges: Sequence[float] = BINS_MM) -> list[str]:
    """``["< 10 mm", "10–20 mm", "20–40 mm", "≥ 40 mm"]`` for the default edges."""
    e = [f"{v:g}" for v in edges]
    return ([f"< {e[0]} mm"] + [f"{a}–{b} mm" for a, b in itertools.pairwise(e)]
            + [f"≥ {e[-1]} mm"])


def bin_of(diameter_mm: float, edges: Sequence[float] = BINS_MM) -> int:
    """Index of the diameter bin (lower edges inclusive: 10.0 mm is in 10–20)."""
    return int(np.searchsorted(np.asarray(edges, np.float64), diameter_mm, side="right"))


def summarize(cases: Iterable[dict], rule: str = DEFAULT_RULE,
              threshold: float = DICE_THRESHOLD, edges: Sequence[float] = BINS_MM) -> dict:
    """Pool per-case results of :func:`analyse` (any number of cases, evaluations, models).

    Returns ``{"rule", "threshold", "cases", "reference_lesions", "false_positives",
    "false_positives_per_case", "bins": [{"bin", "lo_mm", "hi_mm", "lesions", "detected",
    "detection_rate", "dice_mean"}]}``; detection is re-applied under ``rule`` from each
    record's overlap and Dice; a bin without lesions has NaN rate and Dice.
    """
    _check_rule(rule, threshold)
    cases = list(cases)
    labels = bin_labels(edges)
    lo = [0.0] + [float(v) for v in edges]
    hi = [float(v) for v in edges] + [math.inf]
    n, found, dsum = [0] * len(labels), [0] * len(labels), [0.0] * len(labels)
    for case in cases:
        for les in case["lesions"]:
            b = bin_of(les["diameter_mm"], edges)
            n[b] += 1
            found[b] += bool(is_detected(les, rule, threshold))
            dsum[b] += float(les["dice"])
    fp = sum(int(c["false_positives"]) for c in cases)
    bins = [{"bin": labels[b], "lo_mm": lo[b], "hi_mm": hi[b], "lesions": n[b],
             "detected": found[b], "detection_rate": found[b] / n[b] if n[b] else math.nan,
             "dice_mean": dsum[b] / n[b] if n[b] else math.nan} for b in range(len(labels))]
    return {"rule": rule, "threshold": threshold, "cases": len(cases),
            "reference_lesions": sum(n),
            "false_positives": fp,
            "false_positives_per_case": fp / len(cases) if cases else math.nan,
            "bins": bins}
