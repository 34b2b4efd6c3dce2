"""Line plots of the study: per-device memory against the number of devices, the training
curves of a run (its ``metrics.jsonl`` records, hrseg.train.loop), and lesions found by size
per resolution (hrseg.workbench.lesion_table rows)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# (column of memory.study.memory_vs_devices, line style, legend label)
MEMORY_SERIES = (("halo MiB", "o-", "halo (explicit exchange)"),
                 ("gspmd MiB", "s--", "gspmd (XLA partitions)"),
                 ("ideal MiB", "k:", "ideal: whole state + 1-device temporaries / P"))


def memory_vs_devices_figure(rows: Sequence[dict], title: str = ""):
    """Log-log MiB per device against devices, one line per series of
    ``memory.study.memory_vs_devices`` rows. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    p = [r["devices"] for r in rows]
    for key, style, label in MEMORY_SERIES:
        ax.plot(p, [r[key] for r in rows], style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="devices", ylabel="MiB per device (compiled)",
           title=title)
    ax.set_xticks(p, [str(v) for v in p])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def moving_average(values, k: int) -> np.ndarray:
    """Means of ``k`` consecutive values (``len(values) - k + 1`` of them)."""
    return np.convolve(np.asarray(values, float), np.ones(k) / k, mode="valid")


def training_curves(records: Sequence[dict], loss_name: str = "loss"):
    """Training loss and training-batch Dice of every step (thin, a moving average over ~1/20 of
    the run on top), and validation Dice global of each evaluation (markers).

    ``records``: the run's ``metrics.jsonl`` lines as dicts (steps carry ``loss``,
    ``dice_liver``, ``dice_tumour``; evaluations an ``eval`` dict). Returns a Figure.
    """
    from matplotlib.figure import Figure
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval")]
    x = np.array([r["step"] for r in steps])
    k = max(1, len(steps) // 20)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    loss = [r["loss"] for r in steps]
    ax1.plot(x, loss, lw=0.6, alpha=0.5)
    ax1.plot(x[k - 1:], moving_average(loss, k), lw=1.8, color="tab:blue")
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title=loss_name)
    for organ, colour in (("liver", "tab:green"), ("tumour", "tab:red")):
        ax2.plot(x, [r[f"dice_{organ}"] for r in steps], lw=0.6, alpha=0.35, color=colour)
        ax2.plot([e["step"] for e in evals], [e["eval"][f"{organ}_dice_global"] for e in evals],
                 "o-", color=colour, label=f"{organ}: validation Dice global")
    ax2.set(xlabel="step", ylabel="Dice", ylim=(0, 1), title="training batch (thin) / validation")
    ax2.legend(fontsize=8)
    return fig


def detection_by_size(rows: Sequence[dict]):
    """Detection rate (left) and mean per-lesion Dice (right) against the lesion's equivalent
    diameter bin, one line per resolution: the picture of why resolution matters.

    ``rows``: dicts with ``resolution``, ``rule`` and ``bins`` (``bin``, ``lesions``,
    ``detection_rate``, ``dice_mean``), as hrseg.workbench.lesion_table.collect returns; a bin
    without lesions is a gap. The lesion counts are under the bins (each point's, when the
    rows' differ). Returns a Figure.
    """
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    labels = [b["bin"] for b in rows[0]["bins"]] if rows else []
    x = np.arange(len(labels), dtype=float)
    counts = {tuple(b["lesions"] for b in r["bins"]) for r in rows}
    if len(counts) == 1:     # one validation set: the counts once, under the bins
        labels = [f"{lb}\n({k} lesions)" for lb, k in zip(labels, next(iter(counts)))]
    for i, r in enumerate(rows):
        n = [b["lesions"] for b in r["bins"]]
        dx = 0.03 * (i - (len(rows) - 1) / 2)           # side by side where lines coincide
        for ax, key in zip(axes, ("detection_rate", "dice_mean")):
            y = [b[key] if b["lesions"] else np.nan for b in r["bins"]]
            line, = ax.plot(x + dx, y, "o-", label=r["resolution"])
            for xi, yi, ni in zip(x + dx, y, n):
                if ni and len(counts) > 1:
                    ax.annotate(str(ni), (xi, yi), fontsize=7, color=line.get_color(),
                                textcoords="offset points", xytext=(4, 4))
    rule = rows[0]["rule"] if rows else "overlap"
    found = ("any overlap" if rule == "overlap" else
             f"lesion Dice ≥ {rows[0].get('threshold', 0.5):g}")
    for ax, ylabel in zip(axes, (f"detection rate ({found})", "mean per-lesion Dice")):
        ax.set(xticks=x, xticklabels=labels, xlabel="lesion equivalent diameter",
               ylabel=ylabel, ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0].set_title("lesions found, by size")
    axes[1].set_title("how well they are outlined")
    axes[0].legend(title="network input", fontsize=8)
    return fig
