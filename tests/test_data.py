"""NIfTI reading, LiTS/MSD discovery, integrity check, preprocessing, cache, batches, geometry."""
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from hrseg import cli, data
from hrseg.config import DataConfig
from hrseg.data import dataset, nifti, phantom, resample

SMALL = (40, 36, 20)


@pytest.fixture(scope="module")
def lits(tmp_path_factory):
    root = tmp_path_factory.mktemp("lits")
    phantom.write_dataset(root, cases=3, seed=5, shape=SMALL)
    return root


def cfg_for(root, tmp_path, **kw):
    return DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


# --- reading and finding ------------------------------------------------------------------
def test_read_nifti_canonical_and_spacing(tmp_path):
    arr = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    lps = np.diag([-0.7, -0.8, 2.5, 1.0])
    path = nifti.write_nifti(tmp_path / "a.nii.gz", arr, lps)
    got, affine, spacing = data.read_nifti(path)
    np.testing.assert_array_equal(got, arr[::-1, ::-1, :])      # x and y flipped to RAS
    assert got.dtype == np.int16
    np.testing.assert_allclose(spacing, [0.7, 0.8, 2.5])
    assert (np.diag(affine)[:3] > 0).all()
    # voxel (0,0,0) of the canonical array is the same world point as stored voxel (3,2,0)
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], lps @ [3, 2, 0, 1])


def test_read_nifti_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.nii.gz: no such file"):
        data.read_nifti(tmp_path / "nope.nii.gz")
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match="garbage.nii.gz"):
        data.read_nifti(bad)
    good = nifti.write_nifti(tmp_path / "t.nii.gz", np.ones((30, 30, 30), np.float32), np.eye(4))
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"t\.nii\.gz: truncated or unreadable"):
        data.read_nifti(good)


def test_find_cases_lits_natural_order_and_msd(tmp_path):
    for n in (10, 2, 0):
        for kind in ("volume", "segmentation"):
            nifti.write_nifti(tmp_path / "lits" / f"batch{n % 2}" / f"{kind}-{n}.nii",
                              np.zeros((2, 2, 2), np.uint8), np.eye(4))
    (tmp_path / "lits" / "batch0" / "._volume-3.nii").write_bytes(b"macOS fork")
    cases = data.find_cases(tmp_path / "lits")
    assert [c.id for c in cases] == ["0", "2", "10"]
    assert all(c.label.name == f"segmentation-{c.id}.nii" for c in cases)
    msd = tmp_path / "Task03_Liver"
    for i in (0, 11, 2):
        for sub in ("imagesTr", "labelsTr"):
            nifti.write_nifti(msd / sub / f"liver_{i}.nii.gz", np.zeros((2, 2, 2), np.uint8),
                              np.eye(4))
    (msd / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS fork")
    assert [c.id for c in data.find_cases(msd)] == ["liver_0", "liver_2", "liver_11"]
    (msd / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/liver_2.nii.gz", "label": "./labelsTr/liver_2.nii.gz"}]}))
    assert [(c.id, c.label.name) for c in data.find_cases(msd, "msd")] == [
        ("liver_2", "liver_2.nii.gz")]


# --- integrity ----------------------------------------------------------------------------
def _pair(root, n, image=None, label=None, iaff=None, laff=None):
    image = np.zeros((6, 5, 4), np.int16) if image is None else image
    label = np.zeros(image.shape, np.uint8) if label is None else label
    nifti.write_nifti(root / f"volume-{n}.nii.gz", image, np.eye(4) if iaff is None else iaff)
    nifti.write_nifti(root / f"segmentation-{n}.nii.gz", label,
                      np.eye(4) if laff is None else laff)


def test_verify_dataset_one_line_per_problem(tmp_path):
    root = tmp_path / "ds"
    _pair(root, 0)                                                            # clean
    _pair(root, 1, label=np.zeros((6, 5, 3), np.uint8))                       # shape
    _pair(root, 2, laff=np.diag([1.0, 1.0, 2.0, 1.0]))                        # affine
    _pair(root, 3, label=np.full((6, 5, 4), 3, np.uint8))                     # label values
    img = np.zeros((6, 5, 4), np.float32)
    img[0, 0, 0], img[1, 0, 0] = np.nan, np.inf
    _pair(root, 4, image=img)                                                 # NaN / Inf
    _pair(root, 5, image=np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32))
    raw = (root / "volume-5.nii.gz").read_bytes()
    (root / "volume-5.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])        # truncated
    _pair(root, 6)
    (root / "segmentation-6.nii.gz").unlink()                                 # no label
    _pair(root, 7)
    (root / "volume-7.nii.gz").unlink()                                       # no image
    problems = data.verify_dataset(root)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    expect = {"volume-1.nii.gz / segmentation-1.nii.gz: shape mismatch",
              "volume-2.nii.gz / segmentation-2.nii.gz: affine mismatch",
              "volume-3.nii.gz / segmentation-3.nii.gz: labels outside {0, 1, 2}: 120 voxels",
              "volume-4.nii.gz / segmentation-4.nii.gz: image has 1 NaN and 1 Inf voxels",
              "volume-5.nii.gz: truncated or unreadable data",
              "volume-6.nii.gz: missing partner file (no label)",
              "segmentation-7.nii.gz: missing partner file (no image)"}
    for e in expect:
        assert e in text, f"missing '{e}' in:\n{text}"
    assert "-0.nii" not in text
    # the CLI prints them and exits 1; a clean dataset exits 0
    assert cli.main(["verify", str(root)]) == 1
    clean = tmp_path / "clean"
    _pair(clean, 0)
    assert cli.main(["verify", str(clean)]) == 0


def test_verify_empty_or_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    [line] = data.verify_dataset(tmp_path / "empty")
    assert "empty dataset directory" in line
    [line] = data.verify_dataset(tmp_path / "nothing-here")
    assert "no such directory" in line


# --- preprocessing ------------------------------------------------------------------------
def test_window_default_is_mesh_tf():
    hu = np.array([-2000, -512, 0, 256, 512, 3000], np.int16)
    np.testing.assert_allclose(data.window(hu), np.clip(hu / 1024 + 0.5, 0, 1), atol=1e-7)
    with pytest.raises(ValueError, match="hu_window"):
        data.window(hu, (10, 10))


def test_preprocess_shapes_modes_and_ranges():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (50, 40, 30)).astype(np.int16)
    lab = rng.integers(0, 3, (50, 40, 30))
    sp = (0.8, 0.8, 2.0)
    for mode in ("stretch", "spacing"):
        c = DataConfig(resolution=(16, 16, 16), resample=mode)
        img = data.preprocess(hu, sp, c)
        assert img.shape == (16, 16, 16) and img.dtype == np.float32
        assert 0 <= img.min() and img.max() <= 1
        lb = data.preprocess_label(lab, np.diag(list(sp) + [1.0]), c)
        assert lb.shape == (16, 16, 16) and lb.dtype == np.int32 and set(np.unique(lb)) <= {0, 1, 2}
    # spacing mode fits the largest extent (z: 30 * 2 mm = 60 mm) in 16 voxels: 3.75 mm,
    # so x (40 mm) and y (32 mm) are padded with air = 0.
    c = DataConfig(resolution=(16, 16, 16), resample="spacing")
    g = data.grid_for(hu.shape, sp, c)
    assert g.scale == pytest.approx((3.75 / 0.8, 3.75 / 0.8, 3.75 / 2.0))
    assert (data.preprocess(hu, sp, c)[:, 0, :] == 0).all()
    two_d = data.preprocess(hu, sp, DataConfig(resolution=(16, 16)))
    assert two_d.shape == (16, 16, 30)


def test_block_mean_antialiasing_is_an_exact_average():
    x = np.random.default_rng(1).random((64, 64, 8)).astype(np.float32)
    g = resample.grid(x.shape, (1, 1, 1), (8, 8, 8))
    got = resample.apply(g, x, order=1)
    np.testing.assert_allclose(got, x.reshape(8, 8, 8, 8, 8, 1).mean((1, 3, 5)), rtol=1e-5)


@pytest.mark.parametrize("factor", [1, 2])
def test_labels_round_trip_to_original_geometry(lits, tmp_path, factor):
    """At the input's own size (or 2× it) resampling is lossless: back to the file exactly."""
    import nibabel as nib
    case = data.find_cases(lits)[1]
    lab, _, _ = data.read_nifti(case.label)
    c = cfg_for(lits, tmp_path, resolution=tuple(s * factor for s in lab.shape))
    _, label, meta = data.preprocess_case(case, c)
    pred, affine = data.to_original_geometry(label.astype(np.int32), meta)
    stored = nib.load(case.label)
    np.testing.assert_array_equal(pred, np.asanyarray(stored.dataobj))
    np.testing.assert_allclose(affine, stored.affine)
    assert pred.dtype == np.int32


def test_to_original_geometry_shape_for_downsampled_prediction(lits, tmp_path):
    v = data.load_dataset(cfg_for(lits, tmp_path, resolution=(16, 16, 16))).train[0]
    pred, _ = data.to_original_geometry(v.label, v.meta)
    assert pred.shape == tuple(v.meta["shape"]) == SMALL
    assert (pred == 1).sum() > 0.5 * (v.label == 1).sum() * np.prod(SMALL) / 16 ** 3
    with pytest.raises(ValueError, match="not the grid's"):
        data.to_original_geometry(np.zeros((8, 8, 8), np.int32), v.meta)


@pytest.mark.parametrize("mode,res", [("stretch", (16, 16, 16)), ("spacing", (16, 16, 16)),
                                      ("stretch", (32, 32)), ("spacing", (5, 7, 3)),
                                      ("native", None)])
def test_to_input_grid_in_a_box_is_the_whole_result_cut(mode, res):
    """The box path (per-axis index tables) gives exactly the whole resampling's voxels, and
    input_box holds every input voxel an output box's voxels reach."""
    in_shape = (97, 83, 41)
    g = resample.grid(in_shape, (0.7, 0.9, 2.5), res or (1, 1, 1), mode,
                      native_mm=(2.0, 2.3, 3.0))
    rng = np.random.default_rng(0)
    y = (rng.random(g.out_shape) < 0.3).astype(np.uint8) * 2
    full = resample.to_input_grid(g, y)
    for lo, hi in (((0, 0, 0), in_shape), ((3, 5, 7), (50, 60, 30)), ((90, 0, 40), (97, 2, 41))):
        got = resample.to_input_grid(g, y, box=(np.array(lo), np.array(hi)))
        np.testing.assert_array_equal(got, full[tuple(slice(a, b) for a, b in zip(lo, hi))])
    for _ in range(20):
        lo = np.array([rng.integers(0, n) for n in g.out_shape])
        hi = lo + rng.integers(1, 3, 3)
        y = np.zeros(g.out_shape, np.uint8)
        y[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
        reached = np.argwhere(resample.to_input_grid(g, y))
        a, b = resample.input_box(g, lo, np.minimum(hi, g.out_shape))
        assert ((reached >= a) & (reached < b)).all()
        assert (b - a <= np.ceil(np.array(g.scale) * (hi - lo + 2)) + 3).all()   # not all


# --- dataset, cache, batches -------------------------------------------------------------
def test_load_dataset_split_cache_and_invalidation(lits, tmp_path, monkeypatch):
    c = cfg_for(lits, tmp_path, resolution=(16, 16, 16))
    ds = data.load_dataset(c)
    assert (len(ds.train), len(ds.val)) == (2, 1)            # round(3 * 32/131) = 1
    v = ds.train[0]
    assert v.image.shape == (16, 16, 16) and v.image.dtype == np.float32
    assert v.label.dtype == np.int32 and 0 <= v.image.min() and v.image.max() <= 1
    assert v.meta["shape"] == list(SMALL) and len(v.meta["affine"]) == 4
    files = sorted(p.name for p in data.cache_dir(c).iterdir())
    assert len(files) == 9 and not any(f.startswith(".") for f in files)
    # second load: no preprocessing at all, identical arrays
    monkeypatch.setattr(dataset, "preprocess_case", lambda *a: pytest.fail("cache missed"))
    ds2 = data.load_dataset(c)
    assert [x.id for x in ds2.train] == [x.id for x in ds.train]
    np.testing.assert_array_equal(ds2.train[0].image, v.image)
    monkeypatch.undo()
    # another window, or a touched source file, is another cache entry
    data.load_dataset(cfg_for(lits, tmp_path, resolution=(16, 16, 16), hu_window=(-200, 300)))
    st = os.stat(lits / "volume-0.nii.gz")
    os.utime(lits / "volume-0.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    calls = []
    real = data.preprocess_case
    monkeypatch.setattr(dataset, "preprocess_case", lambda *a: calls.append(a) or real(*a))
    data.load_dataset(c)
    assert len(calls) == 1


def test_split_is_deterministic_and_paper_sized():
    ids = [str(i) for i in range(131)]
    train, val = data.split(ids, 0, seed=0)
    assert (len(train), len(val)) == (99, 32)
    assert data.split(ids, 0, seed=0) == (train, val) and data.split(ids, 0, seed=1) != (train, val)
    assert len(data.split(ids, 10)[1]) == 10
    with pytest.raises(ValueError, match="at least one training case"):
        data.split(ids[:3], 3)


def test_batches_deterministic_epochs_and_process_shares(lits, tmp_path):
    ds = data.load_dataset(cfg_for(lits, tmp_path, resolution=(16, 16, 16), n_val=1))
    x, y = data.batch_for_step(ds, 3, 2, seed=1)
    assert x.shape == (2, 16, 16, 16, 1) and x.dtype == np.float32
    assert y.shape == (2, 16, 16, 16) and y.dtype == np.int32
    x2, y2 = data.batch_for_step(ds, 3, 2, seed=1)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # process p gets rows [p*b, (p+1)*b) of the global batch
    parts = [data.batch_for_step(ds, 3, 2, 1, process_index=p, process_count=2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    # batch 1: each epoch (2 steps) visits each of the 2 training cases once
    seen = [data.batch_for_step(ds, s, 1, seed=0)[0].tobytes() for s in range(4)]
    assert len(set(seen[:2])) == 2 and len(set(seen[2:])) == 2
    with pytest.raises(ValueError, match="split evenly"):
        data.batch_for_step(ds, 0, 3, 0, process_count=2)


def test_2d_dataset_stacks_adjacent_slices(lits, tmp_path):
    ds = data.load_dataset(cfg_for(lits, tmp_path, resolution=(16, 16), slices_2d=5))
    v = ds.train[0]
    assert v.image.shape == (16, 16, SMALL[2])
    x, y = data.batch_for_step(ds, 0, 4, seed=0)
    assert x.shape == (4, 16, 16, 5) and y.shape == (4, 16, 16)
    stack = data.stack_slices(v.image, 0, 5)                 # edge-clamped: 0 0 0 1 2
    np.testing.assert_array_equal(stack[..., 0], v.image[:, :, 0])
    np.testing.assert_array_equal(stack[..., 4], v.image[:, :, 2])
    assert data.stack_slices(v.image, None, 3).shape == (SMALL[2], 16, 16, 3)


def test_load_dataset_rejects_broken_pairs(tmp_path):
    root = tmp_path / "ds"
    _pair(root, 0, label=np.full((6, 5, 4), 7, np.uint8))
    with pytest.raises(ValueError, match=r"labels outside \{0, 1, 2\}.*hrseg verify"):
        data.load_dataset(cfg_for(root, tmp_path, resolution=(4, 4, 4)))
    _pair(root, 0)
    (root / "segmentation-0.nii.gz").unlink()
    with pytest.raises(ValueError, match="without a label file"):
        data.load_dataset(cfg_for(root, tmp_path, resolution=(4, 4, 4)))


def test_gzip_is_really_checked_to_the_end(tmp_path):
    """A .gz cut inside the data (header intact) is reported, not silently zero-filled."""
    root = tmp_path / "ds"
    _pair(root, 0, image=np.arange(30 * 30 * 30, dtype=np.int16).reshape(30, 30, 30))
    raw = gzip.decompress((root / "volume-0.nii.gz").read_bytes())
    (root / "volume-0.nii.gz").write_bytes(gzip.compress(raw[:-1000]))     # valid gzip, short
    assert any("volume-0.nii.gz: truncated" in p for p in data.verify_dataset(root))
    shutil.rmtree(root)
