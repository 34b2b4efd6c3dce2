"""The paper-style results table from the training runs in ``runs/``.

A run is a directory directly under the runs folder with ``config.yaml`` and
``checkpoints/eval_<step>.json`` (hrseg.train.loop). Runs are grouped by network input — ``32³``,
``64³`` … (3D) or ``512² 2D`` — one table row each, as in Hou et al. (2019): tumour and liver
Dice per case and Dice global, each ``mean ± std`` over the runs of the row (seeds) × their
last ``last`` evaluations (checkpoints). Runs of one resolution whose recipes differ (in
anything but name, seed, output folder and mesh, which do not change the result) are separate
rows, labelled with their first run's name. Next to them: the per-device memory of the row's training step
(hrseg.memory.estimate) and its median step time.

    rows = results.collect("runs")                  # numbers
    paths = results.write_table(rows, "runs/results")   # results.md / .csv / .png

NaN Dice values (no such class in prediction nor label with ``empty_dice`` None) are left
out of the mean; a row with none left shows "–". A row whose validation cases hold no tumour
at all shows ``n/a`` for the tumour columns (a 0.000 there would be a false positive's score,
not a measurement). :func:`summary` (hrseg/verdict.py) says in one sentence what the table
shows.
"""
from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrseg import atomic, metrics
from hrseg.workbench.verdict import HEADERS, summary, table1, table1_line
from hrseg.workbench.verdict import has_tumour as _has_tumour

METRICS = ("tumour_dice_per_case", "tumour_dice_global", "liver_dice_per_case",
           "liver_dice_global")


# --- small table helpers (also used by the notebooks) -----------------------------------------

def _fmt(value, floatfmt: str) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else format(float(value), floatfmt)
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict], floatfmt: str = ".3f",
                   columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts; columns in first-seen order); NaN -> "–"."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), floatfmt) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: str | Path,
              columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) as CSV with a header; floats at full precision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic.open_atomic(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


def format_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """``"0.712 ± 0.021"``; a single value without ``±``; ``"–"`` for none."""
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


# --- runs ------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    path: Path
    cfg: object                 # hrseg.config.Config
    evals: dict[int, dict]      # step -> evaluation metrics (metrics.evaluate_cases)


def find_runs(root: str | Path = "runs") -> list[Run]:
    """Every run directory directly under ``root`` with a config and ≥ 1 evaluation."""
    from hrseg.train import rundir
    runs = []
    for cfg_path in sorted(Path(root).glob(f"*/{rundir.CONFIG}")):
        d = cfg_path.parent
        evals = {}
        for p in sorted(rundir.checkpoints(d).glob("eval_*.json")):
            try:                  # (written atomically: a cut or other record is damage)
                rec = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{p}: not an evaluation record (truncated or damaged: "
                                 f"{e}); remove it, or write it again with `hrseg evaluate "
                                 f"{d}`") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("metrics", {}), dict):
                raise ValueError(f"{p}: not an evaluation record ({json.dumps(rec)[:40]}; "  # noqa: TRY004
                                 f"expected an object with 'step' and 'metrics'); remove it, "
                                 f"or write it again with `hrseg evaluate {d}`")
            if rec.get("metrics"):
                evals[int(rec.get("step", p.stem.split("_")[1]))] = rec["metrics"]
        if not evals:
            continue
        runs.append(Run(d.name, d, rundir.read_config(d), evals))
    return runs


def row_key(cfg) -> tuple[int, int, str]:
    """Sort key and label of a run's table row: ``(dims order, voxels, "64³")``."""
    res = tuple(int(r) for r in cfg.data.resolution)
    if cfg.data.resample == "native":   # each case its own shape: named by the voxel size
        mm = "×".join(f"{v:g}" for v in cfg.data.native_spacing_mm)
        return (0, math.inf, f"native {mm} mm")
    if cfg.model.dims == 2:
        return (1, math.prod(res), f"{res[0]}² 2D" if len(set(res)) == 1
                else f"{'×'.join(map(str, res))} 2D")
    label = f"{res[0]}³" if len(set(res)) == 1 else "×".join(map(str, res))
    if cfg.data.patch:   # patch-trained, sliding-window evaluated at the same resolution
        p = cfg.data.patch
        label += f", {p[0]}³ patches" if len(set(p)) == 1 else f", {'×'.join(map(str, p))} patches"
    return (0, math.prod(res), label)


def step_time(run_dir: str | Path) -> float:
    """Median wall time of the training steps logged in ``metrics.jsonl`` (robust to the
    compiling first step of each invocation); NaN without a log."""
    from hrseg.train import rundir
    times = [rec["step_time_s"] for rec in rundir.read_metrics(Path(run_dir) / rundir.METRICS)
             if isinstance(rec.get("step_time_s"), (int, float))]
    return float(np.median(times)) if times else math.nan


def recipe(cfg) -> str:
    """What must match for two runs to be seeds of one experiment: JSON of the config without
    the keys tagged ``recipe=False`` in hrseg/schema.py (the run's name, seed, output folder,
    resume flag, cache folder, mesh, conv kernel and runtime)."""
    from hrseg import config
    d = config.to_dict(cfg)
    for key in config.keys(recipe=False):
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
    return json.dumps({k: v for k, v in d.items() if v}, sort_keys=True)


def step_memory(cfg) -> float:
    """Analytic per-device bytes of the run's training step (hrseg.memory.estimate)."""
    from hrseg import memory
    m = cfg.mesh
    est = memory.estimate(cfg.model, tuple(cfg.data.patch or cfg.data.resolution),
                          mesh=(m.data, *m.spatial), policy=cfg.model.precision,
                          optimizer=cfg.train.optimizer, batch=cfg.train.batch,
                          in_channels=cfg.in_channels, backend=m.backend)
    return float(est["total"])


def grouped(root: str | Path = "runs") -> list[tuple[str, list[Run]]]:
    """The table's rows as ``(label, runs)``: runs of one resolution and recipe, sorted 3D by
    size then 2D; a resolution with several recipes labels each by its first run's name."""
    groups: dict[tuple, list[Run]] = {}
    for run in find_runs(root):
        groups.setdefault(row_key(run.cfg) + (recipe(run.cfg),), []).append(run)
    shared: dict[tuple, int] = {}
    for key in groups:
        shared[key[:3]] = shared.get(key[:3], 0) + 1
    return [(key[2] if shared[key[:3]] == 1 else f"{key[2]} ({groups[key][0].name})",
             groups[key]) for key in sorted(groups, key=lambda k: (k[:2], groups[k][0].name))]


def collect(root: str | Path = "runs", last: int = 3, memory: bool = True) -> list[dict]:
    """One dict per table row (resolution), sorted 3D by size then 2D.

    Keys: ``resolution`` (label), ``runs`` (names), ``n`` (evaluations averaged), for each of
    METRICS ``<metric>`` (mean), ``<metric>_std``, ``<metric>_n``; ``devices``,
    ``memory_bytes`` (per device, NaN when ``memory`` is off), ``step_time_s`` (median per
    run, mean over runs) and ``voxels_per_s``.
    """
    if last < 1:
        raise ValueError(f"last must be >= 1 evaluations per run, got {last}")
    rows = []
    for label, runs in grouped(root):
        evals = [run.evals[s] for run in runs for s in sorted(run.evals)[-last:]]
        row = {"resolution": label, "runs": [r.name for r in runs], "n": len(evals)}
        with_tumour = [e["cases_with_tumour"] for e in evals if "cases_with_tumour" in e]
        # validation cases with a tumour (the most over the row's evaluations); -1: not logged
        row["val_tumour_cases"] = int(max(with_tumour)) if with_tumour else -1
        for m in METRICS:
            mean, std, n = metrics.mean_std(e.get(m) for e in evals)
            row.update({m: mean, f"{m}_std": std, f"{m}_n": n})
        cfg = runs[0].cfg
        row["empty_dice"] = cfg.train.empty_dice   # one per row: it is in the recipe
        row["devices"] = int(cfg.mesh.data * math.prod(cfg.mesh.spatial))
        native = cfg.data.resample == "native"     # shapes vary by bucket: not from the config
        row["memory_bytes"] = step_memory(cfg) if memory and not native else math.nan
        row["step_time_s"] = metrics.mean_std(step_time(r.path) for r in runs)[0]
        # network input voxels per second (a 2D step sees `batch` slices)
        row["voxels_per_s"] = math.nan if native else (
            cfg.train.batch * math.prod(cfg.data.patch or cfg.data.resolution)
            / row["step_time_s"])
        rows.append(row)
    return rows


def table(rows: Sequence[dict], digits: int = 3) -> list[dict]:
    """The display form of :func:`collect`'s rows: ``mean ± std`` strings per metric."""
    out = []
    for r in rows:
        d = {"Resolution": r["resolution"]}
        for m in METRICS:
            na = m.startswith("tumour") and not _has_tumour(r)     # metrics.shown's n/a
            d[HEADERS[m]] = (metrics.NOT_APPLICABLE if na else
                             format_mean_std(r[m], r[f"{m}_std"], r[f"{m}_n"], digits))
        paper = table1(r["resolution"])
        d["Table 1 tumour (per case / global)"] = "–" if paper is None else \
            f"{paper[0]:.4f} / {paper[1]:.4f}" + (" (512² × 5)" if "2D" in r["resolution"]
                                                  else "")
        d["Runs × ckpts"] = f"{len(r['runs'])} × {r['n'] // max(len(r['runs']), 1)}" \
            if r["n"] % max(len(r["runs"]), 1) == 0 else str(r["n"])
        mem = r.get("memory_bytes", math.nan)
        d["Memory / device"] = "–" if math.isnan(mem) else _bytes(mem)
        t = r.get("step_time_s", math.nan)
        d["Step time"] = "–" if t is None or math.isnan(t) else f"{t:.2f} s"
        v = r.get("voxels_per_s", math.nan)
        d["Voxels/s"] = "–" if v is None or math.isnan(v) else f"{v:.3g}"
        out.append(d)
    return out


def notes(rows: Sequence[dict]) -> str:
    """What a reader needs beside the table: the empty-mask convention the rows used (a case
    with no tumour in reference nor prediction scores ``train.empty_dice``; Hou et al.'s
    released code scores 0) and Table 1's rows."""
    conv = {r.get("empty_dice", 1.0) for r in rows}
    which = " / ".join("left out" if c is None else f"{c:g}"
                       for c in sorted(conv, key=lambda c: -1 if c is None else c)) or "1"
    return (f"Dice ± std over runs × checkpoints; an empty reference and prediction scores "
            f"{which} (train.empty_dice; Hou et al.'s released code: 0). {table1_line()} The 3D "
            f"resolution study: docs/results.md.")


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# --- outputs ---------------------------------------------------------------------------------

def table_figure(rows: Sequence[dict], title: str | None = None):
    """The display table as a matplotlib Figure (for the PNG)."""
    from matplotlib.figure import Figure
    shown = table(rows)
    cols = list(shown[0]) if shown else ["Resolution"]
    cells = [[r[c] for c in cols] for r in shown] or [["no runs"] + [""] * (len(cols) - 1)]
    fig = Figure(figsize=(1.55 * len(cols), 0.45 * (len(cells) + 1) + 0.6))
    ax = fig.add_subplot()
    ax.set_axis_off()
    labels = [c.replace(" Dice ", "\nDice ") if " Dice " in c else textwrap.fill(c, 16)
              for c in cols]                   # headers wrapped to fit their columns
    t = ax.table(cellText=cells, colLabels=labels, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(9)
    t.scale(1.0, 1.9)
    for (r, _), cell in t.get_celld().items():
        if r == 0:
            cell.set_facecolor("#e8e8e8")
            cell.set_text_props(weight="bold")
            cell.set_height(cell.get_height() * 1.5)     # room for a two-line header
    if title:
        ax.set_title(title, fontsize=11)
    return fig


def write_table(rows: Sequence[dict], out_dir: str | Path, title: str | None = None) -> dict:
    """``results.md`` (display table), ``results.csv`` (every number of :func:`collect`) and
    ``results.png`` under ``out_dir``; returns their paths."""
    from hrseg import viz
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_table(table(rows)) + "\n" + notes(rows) + "\n\n" + summary(rows) + "\n"
    if title:
        md = f"# {title}\n\n{md}"
    atomic.write_text(out / "results.md", md)
    csv_rows = [{**r, "runs": " ".join(r["runs"])} for r in rows]
    columns = ["resolution", "runs", "n"] + [k for m in METRICS
                                             for k in (m, f"{m}_std", f"{m}_n")] + [
        "val_tumour_cases", "empty_dice", "devices", "memory_bytes", "step_time_s", "voxels_per_s"]
    write_csv(csv_rows, out / "results.csv", columns)
    viz.save(table_figure(rows, title), out / "results.png")
    return {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}


def dice_figure(rows: Sequence[dict]):
    """Dice (mean ± std) against the network's input resolution, tumour and liver."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    labels = [r["resolution"] for r in rows]
    x = np.arange(len(rows))
    for ax, organ in zip(fig.subplots(1, 2, sharey=True), ("tumour", "liver")):
        for kind, marker, dx in (("per_case", "o", -0.04), ("global", "s", 0.04)):
            m = f"{organ}_dice_{kind}"   # dx: side by side where the two coincide
            shown = [organ == "liver" or _has_tumour(r) for r in rows]   # n/a: no point
            ax.errorbar(x + dx, [r[m] if ok else math.nan for r, ok in zip(rows, shown)],
                        yerr=[r[f"{m}_std"] if ok else math.nan for r, ok in zip(rows, shown)],
                        marker=marker, capsize=3, label=f"Dice {kind.replace('_', ' ')}")
        ax.set(title=organ, xticks=x, xticklabels=labels, xlabel="network input",
               ylim=(0, 1))
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("Dice (mean ± std)")
    fig.axes[0].legend(fontsize=8)
    return fig


def memory_figure(rows: Sequence[dict], reference: Sequence[dict] = ()):
    """Per-device memory of each row's training step against the input's voxel count;
    ``reference``: extra points ``{"resolution", "voxels", "memory_bytes", "label"}`` (e.g.
    the paper's schedule on one device) drawn as a dashed line."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    vox = [_voxels(r["resolution"]) for r in rows]
    ax.plot(vox, [r["memory_bytes"] / 2 ** 30 for r in rows], "o-",
            label="this study's runs: small CPU-sized U-Nets (per device)")
    for r, v in zip(rows, vox):
        ax.annotate(r["resolution"], (v, r["memory_bytes"] / 2 ** 30), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    groups: dict[str, list] = {}
    for p in reference:
        groups.setdefault(p["label"], []).append(p)
    for label, pts in groups.items():
        ax.plot([p["voxels"] for p in pts], [p["memory_bytes"] / 2 ** 30 for p in pts], "s--",
                label=label)
        for p in pts:
            ax.annotate(p["resolution"], (p["voxels"], p["memory_bytes"] / 2 ** 30), fontsize=8,
                        textcoords="offset points", xytext=(4, -10))
    ax.set(xscale="log", yscale="log", xlabel="voxels per input volume",
           ylabel="GiB per device (analytic)",
           title="training-step memory: the study's small models vs the paper's U-Net")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def _voxels(label: str) -> int:
    head = label.split()[0]
    if head.endswith("³"):
        return int(head[:-1]) ** 3
    if head.endswith("²"):
        return int(head[:-1]) ** 2
    return math.prod(int(v) for v in head.split("×"))
