"""napari tests: a real Qt window under a display (``make test-napari`` runs them in xvfb-run).

Without napari (the ``viewer`` extra) or without a display every test here is skipped with the
reason; ``QT_QPA_PLATFORM=offscreen`` is not a substitute (napari then crashes adding layers:
no GL context, see DESIGN.md). The data are tiny NIfTI files written here with nibabel.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SPACING = (0.7, 0.9, 2.5)       # x, y, z in mm; anisotropic in-plane so aspect errors show
SHAPE = (48, 40, 16)            # canonical RAS+ voxels x, y, z


def _skip_reason() -> str | None:
    missing = [m for m in ("napari", "npe2", "magicgui") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"napari tests need {', '.join(missing)}: pip install -e '.[viewer]' "
                "(make install does it)")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return ("napari tests need a display: run `make test-napari` (xvfb-run; Debian packages "
                "in .ci/run) or run pytest on a desktop")
    return None


def pytest_configure(config):
    # npe2/app-model still use pydantic v1-style fields: third-party noise, not ours.
    for mod in ("npe2", "pydantic", "app_model"):
        config.addinivalue_line("filterwarnings", f"ignore::DeprecationWarning:{mod}.*")


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=reason))


def toy_ras():
    """(hu, labels, prediction) in canonical RAS+ order: an elliptic body in air, a spine at the
    back, a liver ellipsoid on the patient's right (+x) with one tumour, a prediction that is a
    shrunken liver plus a grown tumour."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing="ij")
    hu = np.full(SHAPE, -1000.0, np.float32)
    body = (x / 0.95) ** 2 + (y / 0.85) ** 2 < 1
    hu[body] = 30.0
    hu[(x ** 2 + (y + 0.6) ** 2) < 0.03] = 700.0                       # spine: posterior
    liver = ((x - 0.4) / 0.45) ** 2 + ((y - 0.1) / 0.5) ** 2 + (z / 0.8) ** 2 < 1
    tumour = ((x - 0.45) / 0.18) ** 2 + ((y - 0.15) / 0.2) ** 2 + ((z - 0.1) / 0.4) ** 2 < 1
    hu[liver] = 60.0
    hu[tumour] = 0.0
    lab = np.zeros(SHAPE, np.uint8)
    lab[liver] = 1
    lab[tumour] = 2
    pred_liver = ((x - 0.4) / 0.4) ** 2 + ((y - 0.1) / 0.45) ** 2 + (z / 0.7) ** 2 < 1
    pred_tumour = ((x - 0.45) / 0.22) ** 2 + ((y - 0.15) / 0.24) ** 2 + ((z - 0.1) / 0.45) ** 2 < 1
    pred = np.zeros(SHAPE, np.uint8)
    pred[pred_liver] = 1
    pred[pred_tumour & liver] = 2
    return hu, lab, pred


def write_nifti(path, ras, dtype):
    """Store an RAS+ array the way many LiTS files are (x and y flipped, LPS-like affine), so
    the reader must reorient it to show the picture the right way round."""
    import nibabel as nib
    sx, sy, sz = SPACING
    affine = np.array([[-sx, 0, 0, 170.0], [0, -sy, 0, 150.0], [0, 0, sz, -300.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.ascontiguousarray(ras[::-1, ::-1, :]).astype(dtype), affine)
    img.header.set_zooms(SPACING)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="session")
def lits_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lits")
    hu, lab, pred = toy_ras()
    write_nifti(d / "volume-7.nii.gz", hu, np.int16)
    write_nifti(d / "segmentation-7.nii.gz", lab, np.uint8)
    write_nifti(d / "prediction-7.nii.gz", pred, np.uint8)
    return d


@pytest.fixture
def viewer():
    import napari
    v = napari.Viewer(show=True)
    v.window.resize(900, 700)
    yield v
    v.close()


# --- reading real pixels off the canvas -------------------------------------------------------

def red(img):
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (r > g + 60) & (r > b + 60)


def green(img):
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (g > r + 60) & (g > b + 60)


def bbox(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


def shot(viewer):
    return np.asarray(viewer.screenshot(canvas_only=True))[..., :3]


def image_extent(viewer, layer):
    """Canvas rectangle (r0, c0, r1, c1) covered by an image layer: screenshot it alone with a
    contrast window below every voxel (all white), then restore."""
    visible = {lyr.name: lyr.visible for lyr in viewer.layers}
    limits = layer.contrast_limits
    for lyr in viewer.layers:
        lyr.visible = lyr is layer
    layer.contrast_limits = (-30000.0, -29000.0)
    try:
        return bbox(shot(viewer).min(-1) > 250)
    finally:
        layer.contrast_limits = limits
        for lyr in viewer.layers:
            lyr.visible = visible[lyr.name]


def to_canvas(extent, shape, rows, cols):
    """Canvas rectangle of a (rows, cols) voxel range of an (H, W) slice drawn in ``extent``."""
    r0, c0, r1, c1 = extent
    h, w = shape
    fr, fc = (r1 - r0) / h, (c1 - c0) / w
    return (r0 + rows[0] * fr, c0 + cols[0] * fc, r0 + rows[1] * fr, c0 + cols[1] * fc)


def inside(mask, rect, margin):
    rr, cc = np.nonzero(mask)
    return bool(((rr >= rect[0] - margin) & (rr < rect[2] + margin)
                 & (cc >= rect[1] - margin) & (cc < rect[3] + margin)).all())


@pytest.fixture(scope="session")
def px():
    """The pixel helpers above, for the test modules."""
    import types
    return types.SimpleNamespace(red=red, green=green, bbox=bbox, shot=shot,
                                 image_extent=image_extent, to_canvas=to_canvas, inside=inside,
                                 toy_ras=toy_ras, write_nifti=write_nifti, spacing=SPACING,
                                 shape=SHAPE)
