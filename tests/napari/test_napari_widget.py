"""The "Synthesize tumours" dock widget on an open case: data and rendered pixels."""
import time

import numpy as np


def wait_until(predicate, timeout=120.0):
    from qtpy.QtWidgets import QApplication
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("the synthesis worker did not finish")
        QApplication.processEvents()
        time.sleep(0.01)


def test_synthesis_changes_the_ct_inside_the_liver_only(viewer, lits_dir, px):
    ct, seg, _pred = viewer.open(str(lits_dir / "volume-7.nii.gz"), plugin="hrseg")
    _, widget = viewer.window.add_plugin_dock_widget("hrseg", "Synthesize tumours")
    assert widget.ct.value is ct and widget.labels.value is seg        # not the prediction
    widget.seed.value = 3
    widget.run(block=True)
    assert "tumour voxels" in widget.status.value, widget.status.value
    synth_ct, synth_lab = viewer.layers["synthetic CT"], viewer.layers["synthetic labels"]
    assert tuple(synth_ct.scale) == tuple(ct.scale)
    assert tuple(synth_ct.contrast_limits) == tuple(ct.contrast_limits)

    before, after = np.asarray(ct.data), np.asarray(synth_ct.data)
    lab, new_lab = np.asarray(seg.data), np.asarray(synth_lab.data)
    changed = after != before
    assert changed.any() and not (changed & (lab == 0)).any()       # inside the liver only
    assert np.array_equal(new_lab[lab == 0], lab[lab == 0])
    assert (new_lab == 2).any() and set(np.unique(new_lab)) <= {0, 1, 2}

    # The same on screen: only the liver's pixels differ between the two renderings.
    z = int(np.argmax(changed.sum(axis=(1, 2))))
    point = list(viewer.dims.point)
    point[0] = z * ct.scale[0]
    viewer.dims.point = point
    for lyr in viewer.layers:
        lyr.visible = lyr is ct
    img_before = px.shot(viewer).astype(int)
    ct.visible, synth_ct.visible = False, True
    img_after = px.shot(viewer).astype(int)
    diff = np.abs(img_after - img_before).max(-1) > 8
    assert diff.sum() > 20, "the synthetic tumours are not visible"
    extent = px.image_extent(viewer, ct)
    liver2d = lab[z] > 0
    rows, cols = np.flatnonzero(liver2d.any(1)), np.flatnonzero(liver2d.any(0))
    rect = px.to_canvas(extent, liver2d.shape, (rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1))
    voxel = (extent[3] - extent[1]) / liver2d.shape[1]
    assert px.inside(diff, rect, margin=voxel)

    # The button runs it in a worker thread; the same seed gives the same tumours, and the
    # layers are updated in place rather than added again.
    n_layers = len(viewer.layers)
    synth_ct.data = before.copy()
    widget.button.native.click()
    wait_until(lambda: not widget.busy)
    assert len(viewer.layers) == n_layers
    np.testing.assert_array_equal(np.asarray(viewer.layers["synthetic CT"].data), after)

    widget.probability.value = 0.0
    widget.run(block=True)
    assert "not applied" in widget.status.value
