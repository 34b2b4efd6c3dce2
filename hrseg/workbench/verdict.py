"""What a results table shows, in one or two sentences computed from its numbers.

:func:`summary` reads the rows of :func:`hrseg.workbench.results.collect` (lowest resolution first):
whether tumour **Dice per case** rises with the input resolution over the whole-volume rows —
the metric that rises steadily in Hou et al.'s Table 1 (3D 0.2513 → 0.3589 → 0.4359 → 0.4547
at 64³ → 512³), where Dice global does not (0.5364 → 0.6494 → 0.5783 → 0.7180: a few scans with
very large tumours dominate it) — with Dice global reported beside it, liver Dice global at the
highest resolution, and — where the table holds a patch-trained row and a whole-volume row at
the same resolution — which of the two wins (Wang et al.'s Fig. 4b); where it holds 3D and 2D
rows, whether 3D at its highest resolution beats 2D. Rows whose validation
cases hold no tumour have no tumour figure. :data:`TABLE1` holds the paper's values
(docs/papers.md).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

HEADERS = {"tumour_dice_per_case": "Tumour Dice per case",
           "tumour_dice_global": "Tumour Dice global",
           "liver_dice_per_case": "Liver Dice per case",
           "liver_dice_global": "Liver Dice global"}


# Hou et al. (2019), Table 1: tumour Dice (per case, global), each the mean of 4 models (2 seeds
# × 2 checkpoints) on 32 LiTS validation scans; keyed by the row label's input size.
TABLE1 = {"64³": (0.2513, 0.5364), "128³": (0.3589, 0.6494), "256³": (0.4359, 0.5783),
          "512³": (0.4547, 0.7180), "512² × 5, 2D": (0.4072, 0.6432)}


TABLE1_2D = "512² × 5, 2D"   # Table 1's one 2D row: beside every 2D row of ours


def table1(label: str) -> tuple[float, float] | None:
    """Table 1's (Dice per case, Dice global) for a row label (``"128³"``, ``"128³ (run)"``;
    any 2D row, ``"64² 2D"``, gets Table 1's 2D row), or None where the paper has no such row."""
    key = label.split(" (")[0]
    return TABLE1.get(TABLE1_2D if _is_2d(key) else key)


def _is_2d(label: str) -> bool:
    return "2D" in label.split(" (")[0]


def table1_line() -> str:
    """Table 1's tumour rows in one line, for printing beside a results table."""
    rows = [f"{k} {v[0]:.4f} / {v[1]:.4f}" for k, v in TABLE1.items()]
    return "Hou et al. Table 1 (tumour Dice per case / global): " + "; ".join(rows) + "."


def has_tumour(row: dict) -> bool:
    """False only where the row's validation cases are known to hold no tumour."""
    return row.get("val_tumour_cases", -1) != 0


def _patch_of(label: str) -> tuple[str, str] | None:
    """``"64³, 32³ patches"`` -> ``("64³", "32³")``; None for a whole-volume row."""
    if not label.endswith(" patches") or ", " not in label:
        return None
    whole, patch = label.removesuffix(" patches").split(", ", 1)
    return whole, patch


def _patch_sentences(rows: Sequence[dict], metric: str) -> list[str]:
    """One sentence per patch row that has a whole-volume row at its resolution."""
    by_label = {r["resolution"]: r for r in rows}
    out = []
    for r in rows:
        split = _patch_of(r["resolution"])
        if split is None or split[0] not in by_label:
            continue
        w = by_label[split[0]]
        if not (has_tumour(r) and has_tumour(w)) or math.isnan(r[metric]) or math.isnan(w[metric]):
            continue
        a, b = w[metric], r[metric]
        verdict = ("the whole volume beats patches, as in Wang et al.'s Fig. 4b" if a > b else
                   "patches beat the whole volume, against Wang et al.'s Fig. 4b" if b > a else
                   "a tie")
        out.append(f"At {split[0]}, {HEADERS[metric][0].lower() + HEADERS[metric][1:]} "
                   f"{a:.3f} (whole volume) vs {b:.3f} ({split[1]} patches): {verdict}.")
    return out


def _beside(rows3: Sequence[dict], metric: str) -> str:
    """The other tumour metric's values over the same rows, for the sentence's tail."""
    other = "tumour_dice_global" if metric == "tumour_dice_per_case" else "tumour_dice_per_case"
    vals = [r[other] for r in rows3 if has_tumour(r) and not math.isnan(r.get(other, math.nan))]
    if len(vals) < 2:
        return ""
    paper = ("0.5364 → 0.6494 → 0.5783 → 0.7180, not steadily" if other == "tumour_dice_global"
             else "0.2513 → 0.3589 → 0.4359 → 0.4547, steadily")
    return (f"; {HEADERS[other][0].lower() + HEADERS[other][1:]} beside it "
            f"{' → '.join(f'{v:.3f}' for v in vals)} (Table 1's 3D rows: {paper})")


def _resolution_sentence(rows3: Sequence[dict], metric: str) -> str:
    pts = [(r["resolution"], r[metric]) for r in rows3
           if has_tumour(r) and not math.isnan(r[metric])]
    liver = rows3[-1]["liver_dice_global"]
    at = f"at {rows3[-1]['resolution']}"
    what = HEADERS[metric]
    if len(rows3) == 1:   # one resolution: nothing to compare across resolutions
        return f"Liver Dice global {liver:.3f} {at}." if not math.isnan(liver) else ""
    tail = _beside(rows3, metric) + (f"; liver Dice global {liver:.3f} {at}"
                                     if not math.isnan(liver) else "")
    if len(pts) < 2:
        why = ("no validation tumour" if any(not has_tumour(r) for r in rows3)
               else "fewer than two resolutions with a value")
        return f"{what} cannot be compared across resolutions ({why}){tail}."
    values = " → ".join(f"{v:.3f} ({label})" for label, v in pts)
    diffs = [b[1] - a[1] for a, b in itertools.pairwise(pts)]
    steady = metric == "tumour_dice_per_case"   # what Table 1 shows for this metric
    if all(d > 0 for d in diffs):
        verdict = ("rises with the input resolution, as in Hou et al.'s Table 1" if steady else
                   "rises with the input resolution (in Hou et al.'s Table 1 it does not "
                   "rise steadily)")
    elif all(d < 0 for d in diffs):
        verdict = "falls with the input resolution, against Hou et al.'s Table 1"
    else:
        verdict = ("does not rise steadily with the input resolution, against Hou et al.'s "
                   "Table 1" if steady else "does not rise steadily with the input "
                   "resolution, as in Hou et al.'s Table 1")
    return f"{what} {verdict}: {values}{tail}."


def _dims_sentence(rows3: Sequence[dict], rows2: Sequence[dict], metric: str) -> str:
    """The highest-resolution 3D row against the best-resolved 2D row (issue 32: does 3D at
    128³ beat 2D at 64² × 5?), with what Table 1 shows for the same question."""
    a, b = rows3[-1], rows2[-1]
    if not (has_tumour(a) and has_tumour(b)) or math.isnan(a[metric]) or math.isnan(b[metric]):
        return ""
    verdict = ("3D beats 2D" if a[metric] > b[metric] else
               "2D beats 3D" if b[metric] > a[metric] else "a tie")
    what = HEADERS[metric][0].lower() + HEADERS[metric][1:]
    p2 = TABLE1[TABLE1_2D][0 if metric == "tumour_dice_per_case" else 1]
    beat = [k for k, v in TABLE1.items() if k != TABLE1_2D
            and v[0 if metric == "tumour_dice_per_case" else 1] > p2]
    paper = (f"in Hou et al.'s Table 1, 3D beats 2D 512² × 5 ({p2:.4f}) at "
             f"{', '.join(beat)} only" if beat else "in Table 1 2D beats every 3D row")
    return (f"In 3D at {a['resolution']} {what} is {a[metric]:.3f}, in 2D at "
            f"{b['resolution'].removesuffix(' 2D')} {b[metric]:.3f}: {verdict} ({paper}).")


def summary(rows: Sequence[dict], metric: str = "tumour_dice_per_case") -> str:
    """What the table shows: the resolution trend of ``metric`` (default Dice per case, Table
    1's steady metric) over the 3D whole-volume rows (the 2D rows when there are no 3D ones),
    the other tumour metric beside it, then whole volume vs patches where both are in the
    table."""
    if not rows:
        return "No training run with an evaluation: nothing to compare."
    whole = [r for r in rows if _patch_of(r["resolution"]) is None]
    only3 = [r for r in whole if not _is_2d(r["resolution"])]
    rows3 = only3 or whole
    parts = [_resolution_sentence(rows3, metric)] if rows3 else []
    rows2 = [r for r in whole if _is_2d(r["resolution"])]
    if only3 and rows2:
        parts.append(_dims_sentence(only3, rows2, metric))
    parts += _patch_sentences(rows, metric)
    return " ".join(p for p in parts if p)
