"""Dice scores of label maps (0 background, 1 liver, 2 tumour), as the papers report them.

* Dice per case: the mean over volumes of each volume's Dice.
* Dice global: all volumes pooled as one, ``2 Σ|P∩T| / (Σ|P| + Σ|T|)``.

Regions: ``label=2`` is the tumour; ``label=1`` is the liver *including* its tumours (the LiTS
convention: the liver score is on the organ, not on the tumour-free parenchyma). The same
regions everywhere: the training step counts them on device (train.step.count_overlap) and the
training log's ``dice_liver`` / ``dice_tumour`` are :func:`region_dice` of those counts — a Dice
global over the training batch; the evaluation's ``liver_dice_global`` is the same formula over
the validation volumes.

Padding: voxels labelled ``IGNORE`` (−1) are outside the volume; a prediction there is not
counted (:func:`counts` masks it), so padded and unpadded volumes score the same.

Empty masks: a volume where prediction and truth are both empty scores ``empty`` — 1.0 by
default (nothing to find, nothing found), 0.0 to match the Mesh-TF evaluation code (Hou et
al.'s released code, hence their Table 1), or None to leave such volumes out of the per-case
mean. Runs set it with ``train.empty_dice``; every evaluation records it (``empty_dice``). medpy's ``dc`` returns NaN there under
NumPy 2, which is why this module does not use it.

Shown to a person (:func:`shown`): a tumour score of validation cases that hold no tumour is
``n/a`` — everywhere: the training log line, ``hrseg evaluate``, ``hrseg table`` — since any
number there (0.000 for one false positive voxel, 1.000 for ``empty``) is not a measurement.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

LIVER, TUMOUR = 1, 2
# Voxels labelled IGNORE (padding added to fit a shape to the mesh or the pooling) belong to no
# class: the losses, the training step's counts and the scores leave them out.
IGNORE = -1
# The scored regions, in the order of every (R, 3) counts array: name -> label.
REGIONS = {"liver": LIVER, "tumour": TUMOUR}


NOT_APPLICABLE = "n/a"   # how a score is shown where it measures nothing


def shown(value, applicable: bool = True, digits: int = 3) -> str:
    """A Dice as printed: ``"0.712"``; :data:`NOT_APPLICABLE` where not ``applicable`` or where
    the value is None or NaN (the class absent from prediction and label)."""
    if not applicable or value is None or not math.isfinite(float(value)):
        return NOT_APPLICABLE
    return f"{float(value):.{digits}f}"


def tumour_applicable(result: dict) -> bool:
    """False only where an evaluation's validation cases are known to hold no tumour."""
    return result.get("cases_with_tumour", -1) != 0


def region(volume, label: int):
    """Boolean mask of a class: tumour ``== 2``; liver ``>= 1`` (tumour included). Works on
    NumPy and JAX arrays alike (the training step counts with it on device)."""
    v = volume if hasattr(volume, "dtype") else np.asarray(volume)
    return v >= LIVER if label == LIVER else v == label


def counts(pred, true, label: int = TUMOUR) -> tuple[int, int, int]:
    """``(|P∩T|, |P|, |T|)`` voxel counts of a class in one volume."""
    p, t = region(pred, label), region(true, label)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and label {t.shape} differ in shape")
    p = p & (np.asarray(true) != IGNORE)                     # a prediction on padding is no hit
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def dice_from_counts(inter, pred, true, empty: float | None = 1.0) -> float | None:
    """``2 |P∩T| / (|P| + |T|)`` — the one Dice formula; ``empty`` when both are empty."""
    return empty if pred + true == 0 else float(2.0 * inter / (pred + true))


def region_dice(region_counts, empty: float | None = math.nan) -> dict[str, float | None]:
    """``{"liver": …, "tumour": …}`` from ``(R, 3)`` counts in :data:`REGIONS` order (the
    training step's, summed over its batch: a Dice global of the batch)."""
    c = np.asarray(region_counts, np.int64)
    return {name: dice_from_counts(*c[i], empty) for i, name in enumerate(REGIONS)}


def dice(pred, true, label: int = TUMOUR, empty: float | None = 1.0) -> float | None:
    """Dice of one volume; ``empty`` when both masks are empty."""
    return dice_from_counts(*counts(pred, true, label), empty)


def _pairs(preds: Sequence, labels: Sequence) -> list:
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not preds:
        raise ValueError("no volumes to score")
    return list(zip(preds, labels))


def _mean(scores) -> float:
    kept = [s for s in scores if s is not None]
    return float(np.mean(kept)) if kept else math.nan


def dice_per_case(preds: Sequence, labels: Sequence, label: int = TUMOUR,
                  empty: float | None = 1.0) -> float:
    """Mean over volumes of each volume's Dice (NaN if ``empty=None`` leaves none)."""
    return _mean(dice(p, t, label, empty) for p, t in _pairs(preds, labels))


def dice_global(preds: Sequence, labels: Sequence, label: int = TUMOUR,
                empty: float = 1.0) -> float:
    """Dice of all volumes pooled into one; ``empty`` if the class is absent everywhere."""
    c = np.array([counts(p, t, label) for p, t in _pairs(preds, labels)], np.int64)
    return dice_from_counts(*c.sum(axis=0), empty)


def evaluate_cases(preds: Sequence, labels: Sequence, empty: float | None = 1.0) -> dict:
    """Tumour and liver Dice, per case and global, plus each case's scores.

    Keys: ``tumour_dice_per_case``, ``tumour_dice_global``, ``liver_dice_per_case``,
    ``liver_dice_global``, ``cases``, ``cases_with_tumour``, ``per_case`` (a list of
    ``{"tumour": …, "liver": …}``, None where ``empty=None`` skipped the volume) and
    ``empty_dice``: the convention used (``empty``), so a table can say which it was.
    """
    pairs = _pairs(preds, labels)
    out: dict = {"empty_dice": empty, "cases": len(pairs),
                 "cases_with_tumour": sum(bool(region(t, TUMOUR).any()) for _, t in pairs),
                 "per_case": [{} for _ in pairs]}
    for name, lab in (("tumour", TUMOUR), ("liver", LIVER)):
        c = np.array([counts(p, t, lab) for p, t in pairs], np.int64)      # (n, 3)
        per = [dice_from_counts(*row, empty) for row in c]
        out[f"{name}_dice_per_case"] = _mean(per)
        out[f"{name}_dice_global"] = dice_from_counts(
            *c.sum(axis=0), math.nan if empty is None else float(empty))
        for row, score in zip(out["per_case"], per):
            row[name] = score
    return out


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0.0 for a single value) and count of the
    finite values (None and NaN are left out) — over models, seeds or checkpoints."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0), int(v.size)
