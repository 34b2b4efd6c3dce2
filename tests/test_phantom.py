"""The synthetic CT generator: determinism, geometry, HU and labels, the LiTS files it writes."""
import json
import math

import numpy as np
import pytest

from hrseg import data
from hrseg.data import anatomy, nifti, phantom

SMALL = (48, 44, 24)


def test_same_seed_same_case_other_seed_other_case():
    a = phantom.generate_case(7, SMALL)
    b = phantom.generate_case(7, SMALL)
    c = phantom.generate_case(8, SMALL)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_small_shape_case_is_a_plausible_ct():
    hu, label, affine = phantom.generate_case(1, SMALL)
    assert hu.shape == label.shape == SMALL and hu.dtype == np.float32
    assert affine.shape == (4, 4)
    assert set(np.unique(label)) <= {0, 1, 2} and (label == 1).any()
    assert hu.min() >= -1024 and hu.max() <= 3071
    np.testing.assert_array_equal(hu, np.rint(hu))        # integer HU, like a scanner
    assert (hu < -900).mean() > 0.2                       # air around the body
    liver = hu[label == 1]
    assert 25 < np.median(liver) < 75                     # ~40-60 HU plus noise


def test_default_shape_is_realistic_geometry():
    hu, label, affine = phantom.generate_case(0)
    x, y, z = hu.shape
    assert (x, y) == (512, 512) and 80 <= z <= 200
    spacing = nifti.spacing_of(affine)
    assert 0.68 <= spacing[0] == spacing[1] <= 0.86
    assert spacing[2] in (1.0, 1.25, 1.5, 2.0, 2.5)
    # Tumours hypodense: darker than the liver around them.
    if (label == 2).any():
        assert hu[label == 2].mean() < hu[label == 1].mean() - 10


def test_tumour_list_spans_millimetres_to_centimetres_inside_the_liver():
    counts, radii = [], []
    for seed in range(16):
        rng = np.random.default_rng(seed)
        body = anatomy.Anatomy(rng, (400.0, 400.0), 220.0)
        anatomy.sample_liver_contents(body, rng)
        counts.append(len(body.tumours))
        for t in body.tumours:
            radii.append(t["r"])
            c = np.asarray(t["centre"], np.float32)
            assert body.liver_mask(c[:1], c[1:2], c[2:]).item(), "tumour centre outside liver"
    assert all(0 <= n <= 10 for n in counts) and max(counts) >= 5
    assert min(radii) < 4.0 and max(radii) > 20.0


def test_write_dataset_lits_layout_atomic_and_reused(tmp_path):
    paths = phantom.write_dataset(tmp_path, cases=2, seed=3, shape=SMALL)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["phantom.json", "segmentation-0.nii.gz", "segmentation-1.nii.gz",
                     "tumours.json", "volume-0.nii.gz", "volume-1.nii.gz"]   # no temporaries
    assert [p.name for p in paths][:2] == ["volume-0.nii.gz", "segmentation-0.nii.gz"]
    assert data.verify_dataset(tmp_path) == []
    # The file holds exactly generate_case's arrays and affine, as int16 / uint8.
    hu, label, affine = phantom.generate_case(phantom.case_seed(3, 1), SMALL)
    import nibabel as nib
    img = nib.load(tmp_path / "volume-1.nii.gz")
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), hu)
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "segmentation-1.nii.gz").dataobj), label)
    # Same request again: nothing rewritten. Another request: one error naming both, nothing
    # deleted.
    mtime = (tmp_path / "volume-0.nii.gz").stat().st_mtime_ns
    phantom.write_dataset(tmp_path, cases=2, seed=3, shape=SMALL)
    assert (tmp_path / "volume-0.nii.gz").stat().st_mtime_ns == mtime
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(phantom.PhantomMismatch, match="2 cases, seed 3.*asks for 1 cases"):
        phantom.write_dataset(tmp_path, cases=1, seed=3, shape=SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    m = json.loads((tmp_path / "phantom.json").read_text())
    assert m["cases"] == 2 and m["complete"] and sorted(m["files"]) == before[1:]


def _snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_users_files_are_never_replaced_or_deleted(tmp_path):
    user = tmp_path / "lits"
    user.mkdir()
    (user / "volume-0.nii.gz").write_bytes(b"real CT")
    (user / "volume-7.nii.gz").write_bytes(b"another real CT")
    before = _snapshot(user)
    with pytest.raises(phantom.PhantomMismatch, match="did not write.*volume-0.nii.gz"):
        phantom.write_dataset(user, cases=2, seed=0, shape=SMALL)
    assert _snapshot(user) == before
    # A refused request deletes nothing: arguments are checked before anything is touched.
    ours = tmp_path / "ours"
    phantom.write_dataset(ours, cases=1, seed=0, shape=SMALL)
    before = _snapshot(ours)
    for kwargs in ({"cases": 1, "shape": (0, 0, 0)}, {"cases": 0}, {"cases": 1, "seed": -1},
                   {"cases": 1, "shape": (4096, 4, 4)}):
        with pytest.raises(ValueError, match="^--(cases|seed|shape)"):
            phantom.write_dataset(ours, **kwargs)
        assert _snapshot(ours) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        phantom.write_dataset(tmp_path / "file", cases=1, shape=SMALL)


def test_an_interrupted_write_is_completed_by_the_same_request(tmp_path, monkeypatch):
    calls = []

    def boom(out, i, seed, shape, task="lits"):
        calls.append(i)
        raise KeyboardInterrupt
    monkeypatch.setattr(phantom, "_write_case", boom)
    with pytest.raises(KeyboardInterrupt):
        phantom.write_dataset(tmp_path, cases=1, seed=0, shape=SMALL)
    monkeypatch.undo()
    assert not json.loads((tmp_path / "phantom.json").read_text())["complete"]
    phantom.write_dataset(tmp_path, cases=1, seed=0, shape=SMALL)
    assert data.verify_dataset(tmp_path) == []


def test_read_back_is_canonical_whatever_the_stored_orientation(tmp_path):
    """Cases are stored LPS, RAS or feet-first; read_nifti gives the same RAS array."""
    seen = set()
    for seed in range(12):
        hu, _, affine = phantom.generate_case(seed, (20, 18, 10))
        flips = tuple(bool(affine[d, d] < 0) for d in range(3))
        seen.add(flips)
        path = nifti.write_nifti(tmp_path / f"volume-{seed}.nii.gz", hu, affine, np.int16)
        arr, can_aff, spacing = data.read_nifti(path)
        assert (np.diag(can_aff)[:3] > 0).all()
        expect = hu[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
        np.testing.assert_array_equal(arr, expect)
        np.testing.assert_allclose(spacing, np.abs(np.diag(affine)[:3]))
    assert len(seen) >= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        phantom.generate_case(0, (64, 64))
    with pytest.raises(ValueError, match="cases"):
        phantom.write_dataset("/tmp/never", cases=0)
    assert phantom.case_seed(0, 1) != phantom.case_seed(1, 0)
    assert math.isfinite(phantom.case_seed(0, 0))
