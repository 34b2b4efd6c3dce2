"""The npe2 reader: files -> layers with the right spacing, and what napari really draws."""
from pathlib import Path

import numpy as np
import pytest


def test_manifest_is_registered():
    from npe2 import PluginManager
    pm = PluginManager.instance()
    pm.discover()
    assert "hrseg" in pm._manifests, "plugin not registered: run `pip install -e .` (entry point)"
    mf = pm.get_manifest("hrseg")
    assert [r.filename_patterns[:2] for r in mf.contributions.readers] == [["*.nii", "*.nii.gz"]]
    assert [w.display_name for w in mf.contributions.widgets] == ["Synthesize tumours"]


def test_reader_layers_spacing_and_orientation(lits_dir, px):
    import nibabel as nib

    from hrseg.viz.napari import _reader
    from hrseg.viz.napari._case import to_display
    path = lits_dir / "volume-7.nii.gz"
    assert _reader.get_reader(str(path)) is _reader.read
    assert _reader.get_reader(str(lits_dir / "notes.txt")) is None
    layers = _reader.read(str(path))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("volume-7", "image"), ("segmentation-7", "labels"), ("prediction-7", "labels")]
    # scale is the header's voxel size, reordered like the data: (z, y, x)
    zooms = nib.as_closest_canonical(nib.load(path)).header.get_zooms()
    sx, sy, sz = px.spacing
    for _, kw, _ in layers:
        assert kw["scale"] == pytest.approx((sz, sy, sx))
        assert kw["scale"] == pytest.approx(tuple(float(z) for z in zooms[::-1]))
    hu, lab, pred = px.toy_ras()
    np.testing.assert_array_equal(layers[0][0], to_display(hu))    # reoriented from LPS to RAS
    np.testing.assert_array_equal(layers[1][0], to_display(lab))
    np.testing.assert_array_equal(layers[2][0], to_display(pred))
    assert layers[0][1]["contrast_limits"] == (-200.0, 300.0)


def test_msd_layout_and_run_folder(tmp_path, px):
    from hrseg.viz.napari._case import find_case
    from hrseg.viz.napari._reader import read
    hu, lab, pred = px.toy_ras()
    for sub, arr, dt in (("imagesTr", hu, np.int16), ("labelsTr", lab, np.uint8)):
        (tmp_path / "msd" / sub).mkdir(parents=True)
        px.write_nifti(tmp_path / "msd" / sub / "liver_3.nii.gz", arr, dt)
    layers = read(str(tmp_path / "msd" / "imagesTr" / "liver_3.nii.gz"))
    assert [kw["name"] for _, kw, _ in layers] == ["liver_3", "liver_3 labels"]
    assert find_case(tmp_path / "msd", case=3).volume.name == "liver_3.nii.gz"
    with pytest.raises(FileNotFoundError, match="no case '9'"):
        find_case(tmp_path / "msd", case=9)

    run = tmp_path / "runs" / "r1"
    (run / "predictions").mkdir(parents=True)
    px.write_nifti(run / "predictions" / "liver_3.nii.gz", pred, np.uint8)
    with pytest.raises(FileNotFoundError, match="--data"):
        find_case(run)
    (run / "config.yaml").write_text(f"data:\n  root: {tmp_path / 'msd'}\n")
    case = find_case(run)
    assert (case.volume.parent.name, case.labels.parent.name, case.prediction) == (
        "imagesTr", "labelsTr", run / "predictions" / "liver_3.nii.gz")
    layers = read(str(run))
    assert [kw["metadata"]["hrseg"]["role"] for _, kw, _ in layers] == [
        "ct", "labels", "prediction"]


def test_screenshot_shows_label_colours_where_the_labels_are(viewer, lits_dir, px):
    from hrseg.viz.napari._view import focus_labels
    layers = viewer.open(str(lits_dir / "volume-7.nii.gz"), plugin="hrseg")
    ct, seg, pred = layers
    assert [type(lyr).__name__ for lyr in layers] == ["Image", "Labels", "Labels"]
    sx, sy, sz = px.spacing
    assert tuple(ct.scale) == pytest.approx((sz, sy, sx))
    focus_labels(viewer, layers)
    z = round(viewer.dims.point[0] / ct.scale[0])
    tumour2d = np.asarray(seg.data[z]) == 2
    assert tumour2d.sum() == (np.asarray(seg.data) == 2).sum(axis=(1, 2)).max()

    pred.visible = False
    extent = px.image_extent(viewer, ct)
    # the drawn image has the physical aspect ratio: rows = y * sy, columns = x * sx
    h, w = extent[2] - extent[0], extent[3] - extent[1]
    assert h / w == pytest.approx(px.shape[1] * sy / (px.shape[0] * sx), rel=0.03)

    img = px.shot(viewer)
    assert img.mean() > 20 and img.std() > 20, "screenshot is (nearly) black"
    red, green = px.red(img), px.green(img)
    assert red.sum() > 50 and green.sum() > 50
    voxel = w / tumour2d.shape[1]
    rows, cols = np.flatnonzero(tumour2d.any(1)), np.flatnonzero(tumour2d.any(0))
    rect = px.to_canvas(extent, tumour2d.shape, (rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1))
    assert px.inside(red, rect, margin=voxel), "tumour colour drawn outside the tumour"
    # orientation: the liver is on the patient's right, so on the image's left half
    assert np.nonzero(green)[1].mean() < (extent[1] + extent[3]) / 2

    seg.visible = False
    img = px.shot(viewer)
    assert px.red(img).sum() == 0 and px.green(img).sum() == 0
    assert img.mean() > 20

    pred.visible = True                    # prediction: yellow/orange fill from the reader
    img = px.shot(viewer).astype(int)
    yellow = (img[..., 0] > img[..., 2] + 60) & (img[..., 1] > img[..., 2] + 60)
    assert yellow.sum() > 50


def test_dataset_folder_opens_the_first_case(viewer, lits_dir):
    layers = viewer.open(str(lits_dir), plugin="hrseg")
    assert [lyr.name for lyr in layers] == ["volume-7", "segmentation-7", "prediction-7"]
    assert Path(layers[0].metadata["hrseg"]["path"]).name == "volume-7.nii.gz"
