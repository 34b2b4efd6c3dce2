"""Dice scores of label maps (0 background, 1 liver, 2 tumour), as the papers report them.

* Dice per case: the mean over volumes of each volume's Dice.
* Dice global: all volumes pooled as one, ``2 Σ|P∩T| / (Σ|P| + Σ|T|)``.

Regions: ``label=2`` is the tumour; ``label=1`` is the liver *including* its tumours (the LiTS
convention: the liver score is on the organ, not on the tumour-free parenchyma).

Empty masks: a volume where prediction and truth are both empty scores ``empty`` — 1.0 by
default (nothing to find, nothing found), 0.0 to match the Mesh-TF evaluation code, or None
to leave such volumes out of the per-case mean. medpy's ``dc`` returns NaN there under
NumPy 2, which is why this module does not use it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

LIVER, TUMOUR = 1, 2


def region(volume, label: int) -> np.ndarray:
    """Boolean mask of a class: tumour ``== 2``; liver ``>= 1`` (tumour included)."""
    v = np.asarray(volume)
    return v >= LIVER if label == LIVER else v == label


def counts(pred, true, label: int = TUMOUR) -> tuple[int, int, int]:
    """``(|P∩T|, |P|, |T|)`` voxel counts of a class in one volume."""
    p, t = region(pred, label), region(true, label)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and label {t.shape} differ in shape")
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def dice(pred, true, label: int = TUMOUR, empty: float | None = 1.0) -> float | None:
    """Dice of one volume; ``empty`` when both masks are empty."""
    inter, p, t = counts(pred, true, label)
    return empty if p + t == 0 else 2.0 * inter / (p + t)


def _pairs(preds: Sequence, labels: Sequence) -> list:
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not preds:
        raise ValueError("no volumes to score")
    return list(zip(preds, labels))


def dice_per_case(preds: Sequence, labels: Sequence, label: int = TUMOUR,
                  empty: float | None = 1.0) -> float:
    """Mean over volumes of each volume's Dice (NaN if ``empty=None`` leaves none)."""
    scores = [dice(p, t, label, empty) for p, t in _pairs(preds, labels)]
    scores = [s for s in scores if s is not None]
    return float(np.mean(scores)) if scores else math.nan


def dice_global(preds: Sequence, labels: Sequence, label: int = TUMOUR,
                empty: float = 1.0) -> float:
    """Dice of all volumes pooled into one; ``empty`` if the class is absent everywhere."""
    inter = p = t = 0
    for a, b in _pairs(preds, labels):
        i, pa, tb = counts(a, b, label)
        inter, p, t = inter + i, p + pa, t + tb
    return empty if p + t == 0 else 2.0 * inter / (p + t)


def _absent(empty: float | None) -> float:
    return math.nan if empty is None else float(empty)


def evaluate_cases(preds: Sequence, labels: Sequence, empty: float | None = 1.0) -> dict:
    """Tumour and liver Dice, per case and global, plus each case's scores.

    Keys: ``tumour_dice_per_case``, ``tumour_dice_global``, ``liver_dice_per_case``,
    ``liver_dice_global``, ``cases``, ``cases_with_tumour`` and ``per_case`` (a list of
    ``{"tumour": …, "liver": …}``, None where ``empty=None`` skipped the volume).
    """
    pairs = _pairs(preds, labels)
    out: dict = {"cases": len(pairs),
                 "cases_with_tumour": sum(bool(region(t, TUMOUR).any()) for _, t in pairs)}
    for name, lab in (("tumour", TUMOUR), ("liver", LIVER)):
        c = np.array([counts(p, t, lab) for p, t in pairs], np.int64)      # (n, 3)
        per = [empty if pp + tt == 0 else 2.0 * i / (pp + tt) for i, pp, tt in c]
        kept = [s for s in per if s is not None]
        inter, pp, tt = c.sum(axis=0)
        out[f"{name}_dice_per_case"] = float(np.mean(kept)) if kept else math.nan
        out[f"{name}_dice_global"] = (_absent(empty) if pp + tt == 0
                                      else float(2.0 * inter / (pp + tt)))
        out.setdefault("per_case", [{} for _ in pairs])
        for row, s in zip(out["per_case"], per):
            row[name] = s
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) over models."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


def format_mean_std(values: Iterable[float], digits: int = 3) -> str:
    """``"0.712 ± 0.021"`` (or ``"0.712"`` for one model)."""
    v = list(values)
    m, s = mean_std(v)
    return f"{m:.{digits}f}" if len(v) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"
