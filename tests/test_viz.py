"""hrseg.viz.figures: the pure slice renderer, figures, and the ipywidgets slice viewer (no browser)."""
import io

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from hrseg import viz
from hrseg.viz import viewer


def toy_case(shape=(24, 20, 12)):
    """HU volume + labels: body 40 HU in air, a liver box on the patient's right (+x) with a
    tumour inside it; every value distinct enough to check by hand."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[2:-2, 2:-2, :] = 40.0
    lab = np.zeros(shape, np.uint8)
    lab[12:22, 8:16, 3:9] = 1
    lab[15:19, 10:14, 5:7] = 2
    hu[lab == 1] = 60.0
    hu[lab == 2] = 10.0
    return hu, lab


def is_grey(rgb):
    return (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])


# --- orientation and window -------------------------------------------------------------------

def test_display_orientation_is_radiological():
    v = np.zeros((4, 5, 6))
    v[3, 4, 2] = 1   # patient's far right (+x), most anterior (+y), on axial slice z=2
    s = viz.display_slice(v, 2, 2)
    assert s.shape == (5, 4)          # rows = y, columns = x
    assert s[0, 0] == 1               # anterior at the top, patient's right on the image left
    v = np.zeros((4, 5, 6))
    v[1, 4, 5] = 1   # most anterior, most superior, on sagittal slice x=1
    s = viz.display_slice(v, 0, 1)
    assert s.shape == (6, 5) and s[0, 0] == 1     # superior at the top, anterior on the left
    v = np.zeros((4, 5, 6))
    v[3, 2, 5] = 1   # patient's right, most superior, on coronal slice y=2
    s = viz.display_slice(v, 1, 2)
    assert s.shape == (6, 4) and s[0, 0] == 1
    assert viz.display_spacing((0.7, 0.8, 2.5), 2) == (0.8, 0.7)
    assert viz.display_spacing((0.7, 0.8, 2.5), 0) == (2.5, 0.8)
    assert viz.display_spacing((0.7, 0.8, 2.5), 1) == (2.5, 0.7)


def test_grey_window_level_by_hand():
    # window 500, level 50 = [-200, 300] HU: -200 -> 0, 300 -> 255, 50 -> 127.5 -> 128,
    # 175 -> 0.75 * 255 = 191.25 -> 191; outside the window clips.
    g = viz.grey([-1000, -200, 50, 175, 300, 2000], 500, 50)
    assert g.tolist() == [0, 0, 128, 191, 255, 255]
    assert viz.default_window(np.array([-1000.0, 400.0])) == (-200.0, 300.0)
    lo, hi = viz.default_window(np.array([0.0, 1.0]))      # the [0, 1] image of the HU window
    assert lo == pytest.approx(-200 / 1024 + 0.5) and hi == pytest.approx(300 / 1024 + 0.5)
    assert viz.window_to_level((-200, 300)) == (500, 50)


# --- render_slice -----------------------------------------------------------------------------

def test_render_without_overlays_is_the_windowed_grey_slice():
    hu, lab = toy_case()
    rgb = viz.render_slice(hu, None, None, 2, 5, 500, 50)
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 24, 3)
    assert is_grey(rgb).all()
    np.testing.assert_array_equal(rgb[..., 0], viz.grey(viz.display_slice(hu, 2, 5), 500, 50))
    hidden = viz.render_slice(hu, lab, lab, 2, 5, 500, 50, show_labels=False,
                              show_prediction=False)
    np.testing.assert_array_equal(hidden, rgb)


def test_label_colours_exactly_where_the_labels_are():
    hu, lab = toy_case()
    rgb = viz.render_slice(hu, lab, None, 2, 5, 500, 50)
    lab2d = viz.display_slice(lab, 2, 5)
    np.testing.assert_array_equal(~is_grey(rgb), lab2d > 0)
    # liver: 60 HU -> grey round(0.52 * 255) = 133; blended 0.6 * grey + 0.4 * green
    liver = rgb[lab2d == 1]
    assert (liver == [round(0.6 * 133), round(0.6 * 133 + 0.4 * 255), round(0.6 * 133)]).all()
    # tumour: 10 HU -> grey round(0.42 * 255) = 107; blended towards red
    tumour = rgb[lab2d == 2]
    assert (tumour == [round(0.6 * 107 + 0.4 * 255), round(0.6 * 107), round(0.6 * 107)]).all()
    # on a slice without tumour there is no red
    rgb0 = viz.render_slice(hu, lab, None, 2, 3, 500, 50)
    assert not ((rgb0[..., 0] > rgb0[..., 1]) & (rgb0[..., 0] > rgb0[..., 2])).any()


def test_contours_and_prediction_outline():
    hu, lab = toy_case()
    rgb = viz.render_slice(hu, lab, None, 2, 5, 500, 50, style="contour")
    lab2d = viz.display_slice(lab, 2, 5)
    red = (rgb == viz.TUMOUR_RGB).all(-1)
    np.testing.assert_array_equal(red, viz.outline(lab2d == 2))
    assert red.sum() == 12        # a 4x4 square's outline
    pred = np.zeros_like(lab)
    pred[13:20, 9:15, 4:8] = 1
    rgb = viz.render_slice(hu, None, pred, 2, 5, 500, 50)
    yellow = (rgb == viz.PREDICTION_RGB).all(-1)
    np.testing.assert_array_equal(yellow, viz.outline(viz.display_slice(pred, 2, 5) == 1))
    np.testing.assert_array_equal(~is_grey(rgb), yellow)
    pred[15:18, 11:14, 4:8] = 2   # a predicted tumour inside: its own colour, on top
    rgb = viz.render_slice(hu, None, pred, 2, 5, 500, 50)
    magenta = (rgb == viz.PREDICTION_TUMOUR_RGB).all(-1)
    np.testing.assert_array_equal(magenta, viz.outline(viz.display_slice(pred, 2, 5) == 2))
    assert magenta.any() and (rgb == viz.PREDICTION_RGB).all(-1).any()


def test_render_rejects_bad_input():
    hu, lab = toy_case()
    with pytest.raises(ValueError, match="shape"):
        viz.render_slice(hu, lab[:-1])
    with pytest.raises(ValueError, match="out of range"):
        viz.render_slice(hu, axis=2, index=12)
    with pytest.raises(ValueError, match="style"):
        viz.render_slice(hu, style="dots")


# --- figures ----------------------------------------------------------------------------------

def test_montage_indices_cover_the_labels_and_the_biggest_tumour():
    hu, lab = toy_case()
    idx = viz.montage_indices(hu.shape, lab, axis=2, n=4)
    assert len(idx) == 4 and min(idx) >= 3 and max(idx) <= 8
    assert 5 in idx or 6 in idx
    assert viz.montage_indices(hu.shape, None, axis=2, n=3) == [3, 6, 8]


def test_montage_and_difference_figure_save_atomically(tmp_path):
    hu, lab = toy_case()
    fig = viz.montage(hu, lab, lab, n=4, spacing=(0.8, 0.8, 2.5), title="toy")
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 4 and images[0].shape == (20, 24, 3)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "liver", "tumour", "predicted liver (outline)", "predicted tumour (outline)"]
    out = viz.save(fig, tmp_path / "figs" / "montage.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["montage.png"]   # no temp left

    after = hu.copy()
    after[lab == 2] -= 50
    fig = viz.difference_figure(hu, after, lab, lab)
    titles = [ax.get_title() for ax in fig.axes]
    assert "before (axial z=5)" in titles        # the first slice with the largest change
    diff = fig.axes[2].images[0].get_array()
    assert diff.min() == -50 and diff.max() == 0
    assert "after − before (HU)" in [ax.get_ylabel() for ax in fig.axes]   # the colour bar
    unit_fig = viz.difference_figure(hu / 1000, after / 1000, lab, lab)
    assert "after − before (window units)" in [ax.get_ylabel() for ax in unit_fig.axes]
    # scaled to [0, 1] from data.hu_window (-500, 500): in HU again, as the table beside it
    hu_fig = viz.difference_figure((hu + 500) / 1000, (after + 500) / 1000, lab, lab,
                                   hu_window=(-500, 500))
    assert "after − before (HU)" in [ax.get_ylabel() for ax in hu_fig.axes]
    d = hu_fig.axes[2].images[0].get_array()
    assert d.min() == pytest.approx(-50) and d.max() == pytest.approx(0, abs=1e-9)
    viz.save(fig, tmp_path / "diff.svg")
    assert (tmp_path / "diff.svg").read_text().lstrip().startswith("<?xml")


# --- the slice viewer -------------------------------------------------------------------------

def decode_png(data: bytes) -> np.ndarray:
    from matplotlib.image import imread
    return np.round(imread(io.BytesIO(data), format="png")[..., :3] * 255).astype(np.uint8)


def test_slice_viewer_controls_drive_the_rendered_slice():
    pytest.importorskip("ipywidgets")
    hu, lab = toy_case()
    pred = (lab > 0).astype(np.uint8)
    v = viz.slice_viewer(hu, lab, pred, window=(-200, 300), spacing=(0.8, 0.8, 2.5))
    assert v.axis.value == 2 and v.index.value == 5          # opens on the biggest tumour slice
    assert (v.window.value, v.level.value) == (500, 50)
    np.testing.assert_array_equal(v.rgb, viz.render_slice(hu, lab, pred, 2, 5, 500, 50))
    np.testing.assert_array_equal(decode_png(v.image.value),
                                  viewer.upsample(v.rgb, (0.8, 0.8)))

    first = v.rgb.copy()
    v.index.value = 1                                        # outside the liver: no colour
    assert not np.array_equal(v.rgb, first)
    assert is_grey(v.rgb).all()

    v.index.value = 5
    v.show_labels.value = False
    v.show_prediction.value = False
    assert is_grey(v.rgb).all()
    # window 100 level 0 = [-50, 50]: tumour 10 HU -> 0.6 * 255 = 153, liver 60 HU -> 255,
    # body 40 HU -> 0.9 * 255 = 229.5 -> 230 (round half to even), air -> 0
    v.window.value, v.level.value = 100, 0
    lab2d = viz.display_slice(lab, 2, 5)
    assert set(v.rgb[lab2d == 2][:, 0]) == {153}
    assert set(v.rgb[lab2d == 1][:, 0]) == {255}
    assert v.rgb[3, 5, 0] == 230 and v.rgb[0, 0, 0] == 0

    v.axis.value = 0                                         # sagittal: new range, new slice
    assert v.index.max == hu.shape[0] - 1 and v.index.value == 15
    assert v.rgb.shape == (12, 20, 3)
    big = decode_png(v.image.value)
    assert big.shape[0] / big.shape[1] == pytest.approx(12 * 2.5 / (20 * 0.8), rel=0.05)
    assert "sagittal x=15/23" in v.caption.value


def test_slice_viewer_shows_window_and_level_in_hu_for_scaled_volumes():
    pytest.importorskip("ipywidgets")
    hu, lab = toy_case()
    scaled = (np.clip(hu, -200, 300) + 200) / 500                 # data.hu_window (-200, 300)
    v = viz.slice_viewer(scaled, lab, hu_window=(-200, 300), window=(-200, 300))
    assert (v.window.value, v.level.value) == (500, 50)
    assert v.window.description == "window (HU)" and "level 50 HU" in v.caption.value
    ref = viz.render_slice(np.clip(hu, -200, 300).astype(np.float32), lab, None, 2, 5, 500, 50)
    assert np.abs(v.rgb.astype(int) - ref.astype(int)).max() <= 1
    assert v.image.layout.max_width == "100%"                     # fits the notebook cell


def test_slice_viewer_fits_a_small_screen_with_true_voxel_aspect():
    """A 512² slice is not stretched to the cell's width (949 px at 1366 × 768): it fits the
    display box with its controls, and coronal voxels of 0.7 × 2.5 mm are drawn 1 : 3.6."""
    pytest.importorskip("ipywidgets")
    vol = np.full((512, 512, 100), -1000.0, np.float32)       # air, in HU
    v = viz.slice_viewer(vol, spacing=(0.7, 0.7, 2.5))
    w, h = v.size
    assert (w, h) == (400, 400) and viewer.DISPLAY_BOX == (560, 400)
    assert (v.image.layout.width, v.image.layout.height) == ("400px", "400px")
    assert v.image.layout.align_self == "flex-start"          # not stretched by the VBox
    assert v.image.layout.object_fit == "contain" and v.image.layout.max_width == "100%"
    v.axis.value = 1                                          # coronal: 512 x, 100 z slices
    w, h = v.size
    assert w <= 560 and h <= 400
    assert (h / w) == pytest.approx(100 * 2.5 / (512 * 0.7), rel=0.02)
    assert v.image.layout.height == f"{h}px"
    small = viz.slice_viewer(np.zeros((512, 512, 100), np.float32), box=(300, 200))
    assert small.size == (200, 200)
    assert "0–1 scale" not in v.caption.value                # HU-like values: a unit known
    scaled = viz.slice_viewer(np.zeros((8, 8, 4), np.float32))
    assert "(0–1 scale; pass hu_window for HU)" in scaled.caption.value


def test_slice_viewer_bundle_has_a_static_png():
    pytest.importorskip("ipywidgets")
    hu, lab = toy_case()
    v = viz.slice_viewer(hu, lab)
    bundle, meta = v._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    np.testing.assert_array_equal(decode_png(bundle["image/png"]), viewer.upsample(v.rgb))
    assert meta["image/png"] == dict(zip(("width", "height"), v.size))  # the bounded size
    assert not v.show_prediction.value and v.show_prediction.disabled


def test_slice_viewer_leaves_a_picture_in_an_executed_notebook():
    """What papermill stores: the cell output carries image/png next to the widget view."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no python3 Jupyter kernel installed (make install registers one)")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import numpy as np\nfrom hrseg import viz\n"
        "v = np.zeros((8, 8, 4)); v[2:6, 2:6] = 100\nl = (v > 0).astype(np.uint8)\n"
        "viz.slice_viewer(v, l)")]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = [o for o in nb.cells[0].outputs if o.get("output_type") == "execute_result"]
    assert outputs and "image/png" in outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in outputs[0]["data"]
