"""`hrseg view`: the real command in its own process, and its errors."""
import os
import subprocess
import sys

import numpy as np


def hrseg(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hrseg.cli", *args], capture_output=True, check=False,
                          text=True, timeout=timeout, env=env)


def test_view_screenshot_opens_on_the_tumour(lits_dir, tmp_path, px):
    from matplotlib.image import imread
    out = tmp_path / "shots" / "view.png"
    r = hrseg("view", str(lits_dir), "--case", "7", "--screenshot", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    img = np.round(imread(out)[..., :3] * 255).astype(np.uint8)
    assert img.mean() > 20 and img.std() > 20, "screenshot is (nearly) black"
    assert px.red(img).sum() > 50, "no tumour colour: not opened on the tumour slice?"
    # the prediction is drawn as an outline: yellow pixels, far fewer than its filled area
    i = img.astype(int)
    yellow = (i[..., 0] > i[..., 2] + 60) & (i[..., 1] > i[..., 2] + 60) & (
        np.abs(i[..., 0] - i[..., 1]) < 40)
    assert 0 < yellow.sum() < px.green(img).sum()


def test_view_errors_are_one_line(tmp_path):
    r = hrseg("view", str(tmp_path / "missing.nii.gz"))
    assert r.returncode == 2 and "no such file" in r.stderr
    (tmp_path / "empty").mkdir()
    r = hrseg("view", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no LiTS volume-N" in r.stderr


def test_view_without_display_says_so(lits_dir):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    r = hrseg("view", str(lits_dir / "volume-7.nii.gz"), env=env)
    if sys.platform.startswith("linux"):
        assert r.returncode == 2 and "no display" in r.stderr


def test_view_a_phantom_case(tmp_path, px):
    """The embedded default data, through the same reader: liver on the patient's right."""
    from matplotlib.image import imread

    from hrseg.data import phantom
    phantom.write_dataset(tmp_path / "phantom", cases=1, shape=(64, 64, 32))
    out = tmp_path / "phantom.png"
    r = hrseg("view", str(tmp_path / "phantom" / "volume-0.nii.gz"), "--no-widget",
              "--screenshot", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    img = np.round(imread(out)[..., :3] * 255).astype(np.uint8)
    green = px.green(img)
    assert img.std() > 20 and green.sum() > 50
    body = px.bbox(img.max(-1) > 40)
    assert np.nonzero(green)[1].mean() < (body[1] + body[3]) / 2


def test_open_case_names_the_sliders_and_windows_in_hu(lits_dir):
    from napari.components import ViewerModel

    from hrseg.viz.napari import _view
    v = ViewerModel()  # the viewer's model: no window needed
    layers = _view.open_case(v, lits_dir, case="7")
    assert tuple(v.dims.axis_labels) == ("z (axial)", "y (coronal)", "x (sagittal)")
    ct = next(la for la in layers if la.metadata["hrseg"]["role"] == "ct")
    assert tuple(ct.contrast_limits) == (-200.0, 300.0)   # HU: the abdominal window
