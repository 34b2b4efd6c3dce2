"""Line plots of the study: per-device memory against the number of devices, and the training
curves of a run (its ``metrics.jsonl`` records, hrseg.train.loop)."""
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
