"""data/patches.py: crops are a function of (seed, step, row), stay inside the volume, and a
share ``data.patch_foreground`` of them is centred on a labelled voxel, classes taken evenly."""
import numpy as np
import pytest

from hrseg import config, data
from hrseg.data import patches

SHAPE = (24, 20, 18)
PATCH = (8, 8, 6)


def _dataset(n=3, foreground=1 / 3, shape=SHAPE, empty=False):
    rng = np.random.default_rng(0)
    vols = []
    for i in range(n):
        image = rng.random(shape, np.float32)
        label = np.zeros(shape, np.uint8)
        if not empty:
            label[3:9, 4:10, 2:8] = 1           # a "liver": 216 voxels (1 % of the volume)
            label[20, 15, 14] = 2               # a one-voxel "tumour" near a corner
        vols.append(data.Volume(f"c{i}", image, label, {}))
    cfg = config.DataConfig(resolution=shape, patch=PATCH, patch_foreground=foreground)
    return data.Dataset(vols, [], cfg)


def test_a_step_is_a_function_of_seed_and_step():
    ds = _dataset()
    a = patches.Sampler(ds, PATCH, 1 / 3)(5, batch=2, seed=3)
    b = patches.Sampler(ds, PATCH, 1 / 3)(5, batch=2, seed=3)   # a fresh sampler: a resume
    assert a[0].shape == (2, *PATCH, 1) and a[0].dtype == np.float32
    assert a[1].shape == (2, *PATCH) and a[1].dtype == np.int32
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other = patches.Sampler(ds, PATCH, 1 / 3)(6, batch=2, seed=3)
    assert not np.array_equal(a[0], other[0])
    reseeded = patches.Sampler(ds, PATCH, 1 / 3)(5, batch=2, seed=4)
    assert not np.array_equal(a[0], reseeded[0])


def test_processes_get_their_rows_of_the_same_batch():
    ds = _dataset()
    s = patches.Sampler(ds, PATCH, 0.5)
    whole = s(7, batch=4, seed=1)
    halves = [s(7, batch=4, seed=1, process_index=p, process_count=2) for p in (0, 1)]
    np.testing.assert_array_equal(whole[0], np.concatenate([h[0] for h in halves]))
    with pytest.raises(ValueError, match="split evenly"):
        s(0, batch=3, seed=0, process_count=2)


def test_crops_are_of_the_volume_that_whole_batches_use():
    ds = _dataset(n=4)
    s = patches.Sampler(ds, PATCH, 1 / 3)
    for step in range(6):
        full, _ = data.batch_for_step(ds, step, 1, seed=2)
        crop, _ = s(step, 1, seed=2)
        vol, _ = data.sample_of_row(ds, step, 2)
        corner, _ = patches.crop_corner(s.rng(2, step, step), SHAPE, PATCH, 1 / 3,
                                        lambda vol=vol: s.locations(vol))
        win = tuple(slice(c, c + p) for c, p in zip(corner, PATCH))
        # the crop is the window of the same volume: found at its own corner only
        np.testing.assert_array_equal(crop[0], full[0][win])


def test_corners_stay_inside_and_centred_crops_hold_their_voxel():
    ds = _dataset()
    s = patches.Sampler(ds, PATCH, 1.0)
    for step in range(200):
        img, lab, corner, centred = s.crop(ds.train[0], 0, 0, step, 0)
        assert centred and img.shape == PATCH
        assert np.all(corner >= 0) and np.all(corner + PATCH <= SHAPE)
        assert lab.max() > 0                    # the centre voxel (moved inwards) is inside


def test_foreground_share_and_classes_are_as_nnunet():
    # 3000 draws at p = 1/3: std of the share = sqrt(p (1-p) / n) = 0.0086; 4 std = 0.034.
    ds = _dataset()
    s = patches.Sampler(ds, PATCH, 1 / 3)
    n, centred, tumour = 3000, 0, 0
    for step in range(n):
        _, lab, _, c = s.crop(ds.train[0], 0, 0, step, 0)
        centred += c
        tumour += c and bool((lab == 2).any())
    assert abs(centred / n - 1 / 3) < 0.034
    # a present class is picked uniformly: the one-voxel tumour gets half the centred crops
    # (a liver-centred crop ends at x ≤ 12, short of the tumour at x = 20); std 0.016
    assert abs(tumour / centred - 0.5) < 0.06
    never = patches.Sampler(ds, PATCH, 0.0)
    assert not any(never.crop(ds.train[0], 0, 0, step, 0)[3] for step in range(300))


def test_a_volume_without_foreground_gets_uniform_crops():
    ds = _dataset(empty=True)
    s = patches.Sampler(ds, PATCH, 1.0)
    corners = {tuple(s.crop(ds.train[0], 0, 0, step, 0)[2]) for step in range(50)}
    assert len(corners) > 10                    # uniform, not stuck at one place


def test_class_locations_are_capped_and_exact():
    label = np.zeros((30, 30, 30), np.uint8)
    label[:20] = 1
    label[25, 5, 7] = 2
    loc = patches.class_locations(label, limit=1000)
    assert sorted(loc) == [1, 2]
    assert 500 < len(loc[1]) <= 1000 and np.all(label.reshape(-1)[loc[1]] == 1)
    assert np.unravel_index(loc[2][0], label.shape) == (25, 5, 7)


def test_2d_datasets_have_no_patches():
    cfg = config.DataConfig(resolution=(16, 16))
    ds = data.Dataset([], [], cfg)
    with pytest.raises(ValueError, match="data.patch"):
        patches.Sampler(ds, (8, 8, 8), 1 / 3)
