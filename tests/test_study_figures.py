"""hrseg.viz.halo_figures, augment_figures, curves: the notebooks' figures and the numbers they show.

Each figure is built from small hand-made inputs; the numbers behind it are checked by hand.
Halo blocks on several devices: tests/multidevice/test_equivalence_sharded.py.
"""
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from hrseg import viz


def _lines(ax):
    return [ln for ln in ax.get_lines() if ln.get_label() and not ln.get_label().startswith("_")]


# --- halo_figures -----------------------------------------------------------------------------

def test_padded_windows_by_hand():
    s = np.arange(1, 17, dtype=float).reshape(4, 4)
    w = viz.padded_windows(s, (2, 2), 1)
    assert sorted(w) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # block (0, 0) = rows 0-1, cols 0-1, plus the ring: zeros above and left, neighbours below/right
    np.testing.assert_array_equal(w[0, 0], [[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7],
                                            [0, 9, 10, 11]])
    np.testing.assert_array_equal(w[1, 1], [[6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0],
                                            [0, 0, 0, 0]])


def test_halo_blocks_on_one_device_are_the_zero_padded_slice():
    vol = np.random.default_rng(0).random((8, 6, 4)).astype(np.float32)
    blocks = viz.halo_blocks(vol, (1, 1), 2)
    assert list(blocks) == [(0, 0)] and blocks[0, 0].shape == (12, 10)
    np.testing.assert_array_equal(blocks[0, 0], viz.padded_windows(vol[:, :, 2], (1, 1), 2)[0, 0])


def test_halo_tiles_and_figure():
    s = np.full((4, 4), 0.5)
    blocks = viz.padded_windows(s, (2, 2), 1)
    canvas = viz.halo_canvas(blocks, 1, s.shape, gap=3)
    assert canvas.shape == (2 * 4 + 3, 2 * 4 + 3, 3)
    tile = canvas[:4, :4]                                  # block (0, 0) with its ring
    np.testing.assert_allclose(tile[0, 0], (0.6, 0.0, 0.0))   # outside the volume: red
    np.testing.assert_allclose(tile[1, 1], (0.5, 0.5, 0.5))   # its own voxel: grey
    np.testing.assert_allclose(tile[3, 1], 0.6 * 0.5 + 0.4 * np.array((0.0, 0.8, 1.0)))  # halo
    assert (canvas[4:7] == 1).all()                        # the white gap between tile rows
    fig = viz.halo_figure(s, blocks, 1)
    assert len(fig.axes) == 2 and len(fig.legends[0].get_texts()) == 3
    # display orientation of every other figure (viz.figures.display_slice): transposed, flipped
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(shown, s.T[::-1, ::-1])
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(),
                                  canvas.transpose(1, 0, 2)[::-1, ::-1])


# --- augment_figures --------------------------------------------------------------------------

def _case():
    label = np.zeros((10, 10, 10), np.uint8)
    label[1:9, 1:9, 1:9] = 1          # 512 liver voxels (tumour included)
    label[2:4, 2:4, 2:4] = 2          # two tumours of 8 voxels, not touching
    label[6:8, 6:8, 6:8] = 2
    image = np.where(label == 2, 0.5, np.where(label == 1, 0.6, 0.0))
    return image, label


def test_tumour_stats_by_hand():
    image, label = _case()
    r = viz.tumour_stats(image, label, "x")
    assert r["draw"] == "x" and r["tumours"] == 2
    assert r["tumour share of liver"] == pytest.approx(16 / 512)
    assert r["intensity drop (HU)"] == pytest.approx(0.1 * 1024)
    narrow = viz.tumour_stats(image, label, "x", hu_window=(-150, 250))   # 400 HU to 1
    assert narrow["intensity drop (HU)"] == pytest.approx(0.1 * 400)
    assert np.isnan(viz.tumour_stats(image, np.minimum(label, 1))["intensity drop (HU)"])
    row = viz.summarize([r, {**r, "tumours": 4}], "2 draws")
    assert row["draw"] == "2 draws" and row["tumours"] == "3 ± 1"


def test_flipped_axes_names_the_flip():
    _, label = _case()
    label[1, 2, 3] = 2                                     # break the symmetry
    assert viz.flipped_axes(label, label) == "none"
    assert viz.flipped_axes(label, np.flip(label, (0, 2))) == "xz"
    assert viz.flipped_axes(label, np.rot90(label, 1, (0, 1))) == "?"


def test_augment_figures():
    image, label = _case()
    stats = [viz.tumour_stats(image, label, d) for d in range(3)]
    fig = viz.synthesis_stats_figure(stats, (0.01, 0.2))
    assert len(fig.axes) == 2 and fig.axes[0].get_legend() is not None
    draws = [(image, label), (np.flip(image, 0), np.flip(label, 0))]
    fig = viz.flips_figure(label, draws)
    assert [ax.get_title() for ax in fig.axes] == ["draw 0: flipped none (z=2)",
                                                   "draw 1: flipped x (z=2)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["liver", "tumour"]


def test_tumour_count_histogram_has_integer_ticks_and_a_y_label():
    """Draws with 3, 4 and 4 tumours (matplotlib's default ticks: 2.5, 3.0, 3.5 …): ticks
    only at whole counts and whole numbers of draws."""
    image, label = _case()
    stats = [{**viz.tumour_stats(image, label, d), "tumours": n} for d, n in enumerate((3, 4, 4))]
    fig = viz.synthesis_stats_figure(stats, (0.01, 0.2))
    ax = fig.axes[1]
    assert ax.get_ylabel() == "draws" and fig.axes[0].get_ylabel() == "draws"
    lo, hi = ax.get_xlim()
    xticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert xticks and all(float(t).is_integer() for t in xticks), xticks
    for a in fig.axes:
        lo, hi = a.get_ylim()
        assert all(float(t).is_integer() for t in a.get_yticks() if lo <= t <= hi)


# --- curves -----------------------------------------------------------------------------------

def test_moving_average_by_hand():
    np.testing.assert_allclose(viz.moving_average([1, 2, 3, 6], 2), [1.5, 2.5, 4.5])
    np.testing.assert_allclose(viz.moving_average([1, 2], 1), [1, 2])


def test_memory_vs_devices_figure():
    rows = [{"devices": p, "halo MiB": 100 / p, "gspmd MiB": 120 / p, "ideal MiB": 90 / p}
            for p in (1, 8, 64)]
    ax = viz.memory_vs_devices_figure(rows, "t").axes[0]
    labels = [ln.get_label() for ln in _lines(ax)]
    assert [lb.split()[0].rstrip(":") for lb in labels] == ["halo", "gspmd", "ideal"]
    assert "/ P" in labels[2]                   # the legend says what "ideal" means
    np.testing.assert_allclose(_lines(ax)[0].get_ydata(), [100, 12.5, 100 / 64])
    assert ax.get_xscale() == "log" and ax.get_title() == "t"


def test_training_curves():
    records = [{"step": s, "loss": 1.0 / s, "dice_liver": 0.5, "dice_tumour": 0.1}
               for s in range(1, 41)]
    records.insert(20, {"step": 20, "eval": {"liver_dice_global": 0.8,
                                             "tumour_dice_global": 0.3}})
    fig = viz.training_curves(records, "dice_ce")
    loss_ax, dice_ax = fig.axes
    raw, smooth = loss_ax.get_lines()
    assert len(raw.get_xdata()) == 40 and len(smooth.get_xdata()) == 40 - 2 + 1   # window 40//20
    assert [ln.get_label() for ln in _lines(dice_ax)] == ["liver: validation Dice global",
                                                         "tumour: validation Dice global"]
    np.testing.assert_allclose(_lines(dice_ax)[0].get_ydata(), [0.8])
    assert loss_ax.get_title() == "dice_ce"


def test_detection_by_size_one_line_per_resolution():
    def bins(rates, n):
        return [{"bin": b, "lesions": k, "detection_rate": r, "dice_mean": r / 2}
                for b, r, k in zip(("< 10 mm", "10–20 mm", "20–40 mm", "≥ 40 mm"), rates, n)]
    rows = [{"resolution": "32³", "rule": "overlap", "bins": bins([0.2, 0.5, 1.0, 1.0], [5, 2, 3, 1])},
            {"resolution": "64³", "rule": "overlap", "bins": bins([0.6, 1.0, 1.0, 0.0], [5, 2, 3, 0])}]
    det, dice = viz.detection_by_size(rows).axes
    assert [ln.get_label() for ln in _lines(det)] == ["32³", "64³"]
    np.testing.assert_allclose(_lines(det)[0].get_ydata(), [0.2, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(_lines(dice)[1].get_ydata(), [0.3, 0.5, 0.5, np.nan])  # no lesion: gap
    assert [t.get_text() for t in det.get_xticklabels()] == ["< 10 mm", "10–20 mm", "20–40 mm",
                                                             "≥ 40 mm"]
    assert "any overlap" in det.get_ylabel()
    assert [t.get_text() for t in det.texts] == ["5", "2", "3", "1", "5", "2", "3"]   # per point
    rows[1]["bins"][3]["lesions"] = 1                       # the same cases: counts under the bins
    det = viz.detection_by_size(rows).axes[0]
    assert not det.texts and det.get_xticklabels()[0].get_text() == "< 10 mm\n(5 lesions)"
