"""buckets.py and ``resample: native``: bucket sizes, padding that crops nothing, same-bucket
batches that are a function of (seed, step), augmentation that keeps the padding in place."""
import math

import jax
import numpy as np
import pytest

from hrseg import data
from hrseg.config import AugmentConfig, DataConfig
from hrseg.data import augment, buckets, nifti, phantom, resample
from hrseg.metrics import IGNORE

SPACING = (2.0, 2.0, 3.0)                       # every case of the fixture, mm
SHAPES = [(40, 40, 24), (36, 40, 30), (40, 32, 18), (32, 36, 22), (38, 38, 26)]


def write_native_dataset(root, shapes=SHAPES, spacing=SPACING):
    """LiTS-layout cases of different shapes at one voxel spacing (stored LPS, like DICOM)."""
    for i, shape in enumerate(shapes):
        hu, label, _ = phantom.generate_case(phantom.case_seed(3, i), shape)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        affine[:3, 3] = (10.0 * i, -5.0, 100.0)
        nifti.write_nifti(root / f"volume-{i}.nii.gz", hu, affine, np.int16)
        nifti.write_nifti(root / f"segmentation-{i}.nii.gz", label, affine, np.uint8)
    return root


@pytest.fixture(scope="module")
def native_root(tmp_path_factory):
    return write_native_dataset(tmp_path_factory.mktemp("native"))


def native_cfg(root, tmp_path, **kw):
    kw = {"native_spacing_mm": SPACING, "n_val": 1, **kw}
    return DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), resample="native", **kw)


def test_bucket_sizes_divide_cover_and_are_few():
    for m in (1, 2, 8, 16):
        for q in (1, 2, 3, 4):
            for n in range(1, 300):
                s = buckets.bucket_size(n, m, q)
                need = -(-n // m)
                assert s % m == 0 and s >= n, (n, m, q, s)
                assert s <= m * math.ceil(2 ** (1 / q) * need), (n, m, q, s)   # bounded waste
    # Wang's 80–200 slices, 3 poolings: a handful of sizes per axis, not 121
    for q in (1, 2, 3, 4):
        sizes = {buckets.bucket_size(n, 8, q) for n in range(80, 201)}
        assert len(sizes) <= math.ceil(q * math.log2(200 / 80)) + 1, (q, sorted(sizes))
    assert sorted({buckets.bucket_size(n, 8, 3) for n in range(80, 201)}) == \
        [88, 104, 128, 168, 208]                  # 8·{11, 13, 16, 21, 26}: ⌈2^(j/3)⌉
    assert buckets.bucket_shape((37, 64, 100), (4, 4, 8), 3) == (44, 64, 104)
    with pytest.raises(ValueError, match="rank"):
        buckets.bucket_shape((4, 4), (2, 2, 2), 3)


def test_pad_crops_nothing_and_crop_undoes_it():
    rng = np.random.default_rng(0)
    image = rng.random((5, 6, 7), np.float32) + 0.25
    label = rng.integers(0, 3, (5, 6, 7)).astype(np.uint8)
    img, lab = buckets.pad(image, label, (8, 8, 12))
    assert img.shape == lab.shape == (8, 8, 12) and lab.dtype == np.int32
    np.testing.assert_array_equal(buckets.crop(img, image.shape), image)
    np.testing.assert_array_equal(buckets.crop(lab, label.shape), label)
    assert (lab == IGNORE).sum() == 8 * 8 * 12 - 5 * 6 * 7
    assert np.all(img[lab == IGNORE] == image.min())          # background = the case's minimum
    with pytest.raises(ValueError, match="nothing is cropped"):
        buckets.pad(image, label, (4, 8, 8))


def test_native_grid_keeps_the_extent_at_the_asked_spacing():
    g = resample.grid((512, 512, 100), (0.8, 0.8, 2.5), (64, 64, 64), "native",
                      native_mm=(1.62, 1.62, 3.22))
    assert g.out_shape == (round(512 * 0.8 / 1.62), round(512 * 0.8 / 1.62), round(250 / 3.22))
    assert not g.pad                                # no padding or cropping in the resampling
    # faces on faces: the first and last output voxels' edges are the input's
    for n, o, a, b in zip(g.in_shape, g.out_shape, g.scale, g.offset):
        assert a * o == pytest.approx(n) and b == pytest.approx(a / 2 - 0.5)
    same = resample.grid((40, 40, 24), SPACING, (16, 16, 16), "native", native_mm=SPACING)
    assert same.out_shape == (40, 40, 24) and same.scale == (1.0, 1.0, 1.0)


def test_every_labelled_voxel_reaches_the_batches(native_root, tmp_path):
    cfg = native_cfg(native_root, tmp_path, native_spacing_mm=(4.0, 4.0, 4.5))
    ds = data.load_dataset(cfg)
    assert data.cache_dir(cfg).name == "native-4.0x4.0x4.5mm"
    shapes = {v.image.shape for v in ds.train}
    assert len(shapes) == len(ds.train) > 2            # each case its own shape
    sample = buckets.Sampler(ds, (2, 2, 4), per_octave=3)
    batch = 2
    n = sample.batches_per_epoch(batch)
    seen = set()
    for step in range(n):                               # one epoch: every case at least once
        images, labels = sample(step, batch, seed=7)
        cases = sample.cases_of_step(step, batch, seed=7)
        assert images.shape[:-1] == labels.shape == (batch, *sample.shape_of_step(step, batch, 7))
        assert all(s % m == 0 for s, m in zip(labels.shape[1:], (2, 2, 4)))
        for row, vol in enumerate(cases):
            v = ds.train[vol]
            assert sample.buckets[vol] == labels.shape[1:]          # one bucket per batch
            own = buckets.crop(labels[row], v.image.shape)
            np.testing.assert_array_equal(own, v.label)            # every voxel, not IGNORE
            assert (labels[row] != IGNORE).sum() == v.label.size
            assert (labels[row] > 0).sum() == (v.label > 0).sum() > 0
            np.testing.assert_array_equal(buckets.crop(images[row, ..., 0], v.image.shape),
                                          v.image)
            seen.add(vol)
    assert seen == set(range(len(ds.train)))
    # a function of (seed, step): a fresh sampler, and process shares, give the same rows
    again = buckets.Sampler(ds, (2, 2, 4), per_octave=3)
    for step in (0, n - 1, n, 3 * n + 1):
        a = sample(step, batch, seed=7)
        b = again(step, batch, seed=7)
        halves = [again(step, batch, seed=7, process_index=p, process_count=2) for p in (0, 1)]
        for x, y, z in zip(a, b, zip(*halves)):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, np.concatenate(z))
    epochs = [[tuple(b) for b in sample.epoch(7, e, batch)] for e in range(4)]
    assert len({tuple(e) for e in epochs}) > 1          # reshuffled each epoch


def test_native_prediction_comes_back_on_the_original_grid(native_root, tmp_path):
    """Labels through preprocessing, padding, cropping and to_original_geometry: at the
    cases' own spacing nothing changes — every labelled voxel of the file comes back."""
    import nibabel as nib
    ds = data.load_dataset(native_cfg(native_root, tmp_path))
    for v in ds.train + ds.val:
        padded = buckets.pad(v.image, v.labels_u8, buckets.bucket_shape(v.image.shape,
                                                                          (4, 4, 4), 3))[1]
        pred = buckets.crop(padded, v.image.shape)                 # an identity "network"
        back, affine = data.to_original_geometry(pred, v.meta)
        stored = np.asarray(nib.load(v.meta["label_path"]).dataobj)
        np.testing.assert_array_equal(back, stored)
        np.testing.assert_allclose(affine, nib.load(v.meta["label_path"]).affine)


def test_augment_keeps_the_padding_labelled_ignore():
    rng = np.random.default_rng(1)
    label = np.zeros((12, 10, 8), np.uint8)
    label[2:9, 2:8, 1:6] = 1
    label[4:6, 4:6, 2:4] = 2
    image = rng.random(label.shape, np.float32)
    img, lab = buckets.pad(image, label, (16, 12, 8))
    marker = (lab == IGNORE).astype(np.float32)[..., None]       # image = the padding mask
    for p in (0.0, 1.0):
        cfg = AugmentConfig(tumour_synthesis_p=p)
        for k in range(6):
            key = jax.random.key(k)
            _, new_lab = jax.jit(lambda a, b, c=cfg, kk=key:
                                 augment.augment_padded(kk, a, b, c))(img[..., None], lab)
            new_lab = np.asarray(new_lab)
            assert (new_lab == IGNORE).sum() == (lab == IGNORE).sum()
            assert set(np.unique(new_lab)) <= {IGNORE, 0, 1, 2}
            if p == 0:                        # the padding moved exactly as the image did
                moved, _ = augment.augment(key, marker, np.where(lab < 0, 0, lab), cfg)
                np.testing.assert_array_equal(np.asarray(moved)[..., 0] == 1,
                                              new_lab == IGNORE)
