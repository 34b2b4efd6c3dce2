"""The per-lesion table of the runs in ``runs/``: lesions found, by size, per resolution.

Each evaluation that ``hrseg evaluate`` or the training loop wrote holds a per-lesion record
under ``metrics["lesions"]`` (hrseg.train.inference.LesionScorer: every reference lesion of each
validation case on its original grid, with its equivalent diameter, overlap and Dice, and the
false positives). Rows are the Dice table's (hrseg.workbench.results.grouped: one per
resolution and recipe); each pools the lesions of its runs × their last ``last`` evaluations
that have such a record, and :func:`hrseg.lesions.summarize` bins them by equivalent diameter
under one detection rule (re-applied from the records, whatever rule they were written with).

    rows = lesion_table.collect("runs", last=2)          # numbers
    lesion_table.write(rows, "runs/results")             # lesions.md / .csv / .png
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from hrseg import atomic, lesions
from hrseg.workbench import results


def collect(root: str | Path = "runs", last: int = 3, rule: str = lesions.DEFAULT_RULE,
            threshold: float = lesions.DICE_THRESHOLD) -> list[dict]:
    """One dict per row with per-lesion data: ``resolution``, ``runs``, ``n`` (evaluations
    pooled) and :func:`hrseg.lesions.summarize`'s keys (``bins``, ``false_positives_per_case``
    …); rows without any per-lesion evaluation are left out."""
    if last < 1:
        raise ValueError(f"last must be >= 1 evaluations per run, got {last}")
    rows = []
    for label, runs in results.grouped(root):
        records = [rec for run in runs for rec in _lesion_records(run, last)]
        if not records:
            continue
        cases = [case for rec in records for case in rec["per_case"]]
        rows.append({"resolution": label, "runs": [r.name for r in runs], "n": len(records),
                     **lesions.summarize(cases, rule, threshold)})
    return rows


def _lesion_records(run: results.Run, last: int) -> list[dict]:
    """The per-lesion records of a run's last ``last`` evaluations that have one."""
    return [run.evals[s]["lesions"] for s in sorted(run.evals)
            if run.evals[s].get("lesions")][-last:]


def _rate(b: dict) -> str:
    if not b["lesions"]:
        return "–"
    return f"{b['detection_rate']:.2f} ({b['detected']}/{b['lesions']})"


def table(rows: Sequence[dict]) -> list[dict]:
    """Display form: per bin the detection rate (detected/lesions, pooled over the row's
    evaluations) and the mean per-lesion Dice; false-positive lesions per case."""
    out = []
    for r in rows:
        d = {"Resolution": r["resolution"], "Evaluations": r["n"],
             "Lesions": r["reference_lesions"]}
        for b in r["bins"]:
            d[f"{b['bin']} detected"] = _rate(b)
            d[f"{b['bin']} Dice"] = "–" if not b["lesions"] else f"{b['dice_mean']:.3f}"
        fp = r["false_positives_per_case"]
        d["FP / case"] = "–" if math.isnan(fp) else f"{fp:.2f}"
        out.append(d)
    return out


def markdown(rows: Sequence[dict]) -> str:
    """The table in markdown, with a line saying the rule and what the cells are."""
    if not rows:
        return "no per-lesion evaluations\n"
    rule = rows[0]["rule"]
    how = ("any predicted voxel on the lesion (LiTS)" if rule == "overlap" else
           f"the lesion's Dice ≥ {rows[0]['threshold']:g}")
    return (results.markdown_table(table(rows)) + f"\nLesions: 26-connected components of the "
            f"reference tumour label on each case's original grid, binned by equivalent "
            f"diameter; detected: {how}. Counts pooled over each row's evaluations; Dice: "
            f"mean per-lesion Dice (0 for a missed lesion); FP: predicted components touching "
            f"no reference lesion.\n")


def write(rows: Sequence[dict], out_dir: str | Path) -> dict:
    """``lesions.md``, ``lesions.csv`` (one line per row and bin) and ``lesions.png``
    (hrseg.viz.detection_by_size) under ``out_dir``; returns their paths."""
    from hrseg import viz
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "lesions.md", markdown(rows))
    flat = [{"resolution": r["resolution"], "runs": " ".join(r["runs"]), "evaluations": r["n"],
             "rule": r["rule"], **b, "false_positives_per_case": r["false_positives_per_case"]}
            for r in rows for b in r["bins"]]
    results.write_csv(flat, out / "lesions.csv")
    viz.save(viz.detection_by_size(rows), out / "lesions.png")
    return {"md": out / "lesions.md", "csv": out / "lesions.csv", "png": out / "lesions.png"}


def main(runs_dir: str | Path, last: int = 3, rule: str = lesions.DEFAULT_RULE,
         out: str | Path | None = None) -> int:
    """``hrseg table --lesions``: print the table, write the files; no per-lesion data is a
    ValueError naming the folder (one line from the CLI)."""
    rows = collect(runs_dir, last=last, rule=rule)
    if not rows:
        raise ValueError(f"no run with a per-lesion evaluation under {runs_dir} (evaluations "
                         f"written before it existed get one from `hrseg evaluate RUN_DIR`)")
    paths = write(rows, out or Path(runs_dir) / "results")
    print(paths["md"].read_text().strip())
    print(f"\nlesion table: {paths['md']} (also {paths['csv'].name}, {paths['png'].name})")
    return 0
