"""What the augmentation does to a case: statistics of synthetic tumours over many draws, and
flips. Volumes are ``(X, Y, Z)`` arrays; labels 1 liver, 2 tumour (as in hrseg.data)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from hrseg.viz.figures import _finish, _legend_handles, interesting_index, render_slice

STATS = ("tumour share of liver", "tumours", "intensity drop (HU)")


def tumour_stats(image, label, name="", hu_window=(-512.0, 512.0)) -> dict:
    """One draw: the tumour share of the liver, the number of separate tumours (26-connected) and
    the mean intensity drop from parenchyma to tumour in HU (``image`` in [0, 1], scaled from
    ``hu_window``: data.hu_window, by default 1024 HU to 1)."""
    image, label = np.asarray(image), np.asarray(label)
    liver, tumour = label >= 1, label == 2
    _, blobs = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
    hu_per_unit = float(hu_window[1]) - float(hu_window[0])
    drop = ((image[liver & ~tumour].mean() - image[tumour].mean()) * hu_per_unit
            if tumour.any() else np.nan)
    return {"draw": name, STATS[0]: tumour.sum() / max(liver.sum(), 1), STATS[1]: blobs,
            STATS[2]: float(drop)}


def summarize(stats: Sequence[dict], name: str) -> dict:
    """``mean ± std`` of each statistic over draws (NaN ignored), as a table row named ``name``."""
    return {"draw": name, **{k: f"{np.nanmean([r[k] for r in stats]):.3g} ± "
                                f"{np.nanstd([r[k] for r in stats]):.2g}" for k in STATS}}


def synthesis_stats_figure(stats: Sequence[dict], fraction: Sequence[float] | None = None):
    """Histograms of the tumour share of the liver (the requested ``fraction`` range shaded) and
    of the number of tumours per draw (one bar per count, integer ticks). Returns a Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    share = [r[STATS[0]] for r in stats]
    counts = [r[STATS[1]] for r in stats]
    fig = Figure(figsize=(9, 3), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.hist(share, bins=10, color="tab:red", alpha=0.7)
    if fraction is not None:
        ax1.axvspan(*fraction, color="grey", alpha=0.15, label="requested range")
        ax1.legend(fontsize=8)
    ax1.set(xlabel="tumour share of the liver", ylabel="draws")
    ax2.hist(counts, bins=np.arange(min(counts), max(counts) + 2) - 0.5, color="tab:blue",
             alpha=0.7)
    ax2.set(xlabel="separate tumours per draw", ylabel="draws")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax1, ax2):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def flipped_axes(original, flipped) -> str:
    """Which axes of ``original`` were flipped to give ``flipped`` ("xz", "none"; "?" if none
    of the 8 flips does)."""
    original, flipped = np.asarray(original), np.asarray(flipped)
    for axes in itertools.chain.from_iterable(itertools.combinations(range(3), k)
                                              for k in range(4)):
        if original.shape == flipped.shape and np.array_equal(
                np.flip(original, axes) if axes else original, flipped):
            return "".join("xyz"[a] for a in axes) or "none"
    return "?"


def flips_figure(label, draws: Sequence[tuple]):
    """One panel per ``(image, label)`` draw of ``augment.flip_rotate``: its axial slice with the
    most tumour, titled with the axes flipped relative to ``label``, a legend of the label
    colours under the panels. Returns a Figure."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2.75 * len(draws), 3.2), layout="constrained")
    for d, (ax, (img, lab)) in enumerate(zip(np.atleast_1d(fig.subplots(1, len(draws))), draws)):
        img, lab = np.asarray(img), np.asarray(lab)
        index = interesting_index(lab, 2, lab.shape)
        ax.imshow(render_slice(img, lab, axis=2, index=index))
        ax.set_title(f"draw {d}: flipped {flipped_axes(label, lab)} (z={index})", fontsize=9)
        ax.set_axis_off()
    return _finish(fig, _legend_handles(label, None, "fill"), None)
