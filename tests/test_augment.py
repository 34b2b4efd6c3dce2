"""Augmentation invariants: synthesis stays in the liver, flips keep alignment, jit == eager."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrseg.config import AugmentConfig
from hrseg.data import augment


def _case(shape=(24, 28, 20), tumour=True, seed=0):
    """Windowed image: noisy background, liver 0.55, tumour 0.50 (difference 0.05)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    liver = ((grid / np.array([0.7, 0.6, 0.8])[:, None, None, None]) ** 2).sum(0) < 1
    label = liver.astype(np.int32)
    if tumour:
        label[((grid - np.array([0.2, 0.1, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.06] = 2
    image = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    image[label == 1] = 0.55
    image[label == 2] = 0.50
    return jnp.asarray(image), jnp.asarray(label)


def test_synthesis_invariants():
    image, label = _case()
    key = jax.random.key(0)
    new_img, new_lab = augment.synthesize_tumours(key, image, label, fraction=(0.1, 0.2))
    liver = np.asarray(label) >= 1
    ni, nl = np.asarray(new_img), np.asarray(new_lab)
    np.testing.assert_array_equal(ni[~liver], np.asarray(image)[~liver])   # bit-identical
    np.testing.assert_array_equal(nl[~liver], 0)
    assert set(np.unique(nl)) <= {0, 1, 2} and nl.dtype == np.int32
    assert (nl[liver] >= 1).all()                                           # liver stays liver
    share = (nl == 2).sum() / liver.sum()
    assert 0.09 <= share <= 0.21                                            # 10-20 % of liver
    # new tumours darker than the liver: d = 1.15 * 0.05 times the blurred blob mask (~d
    # inside a blob, d/2 on its edge)
    d = 1.15 * (0.55 - 0.50)
    assert float(augment.liver_tumour_difference(image, label)) == pytest.approx(d, rel=1e-5)
    core = (nl == 2) & (np.asarray(label) == 1)
    assert ni[core].min() < 0.55 - 0.75 * d and ni[core].mean() < 0.55 - 0.3 * d
    assert (np.abs(ni - np.asarray(image))[liver] <= d + 1e-6).all()      # |change| <= d
    # removed tumours (old tumour voxels now liver) brightened back towards liver values
    healed = (np.asarray(label) == 2) & (nl == 1)
    assert healed.any() and ni[healed].mean() > 0.50 + 0.4 * d
    assert ni[healed].max() > 0.50 + 0.8 * d


def test_no_synthesis_without_tumour_or_liver_or_contrast():
    """As the released code: a tumour-free case (NaN contrast -> 0), a case without liver, and
    one whose tumour is not darker than its liver (d <= 1e-4) come back unchanged."""
    image, label = _case(tumour=False)
    assert float(augment.liver_tumour_difference(image, label)) == 0.0
    for lab in (label, jnp.zeros_like(label)):
        same_img, same_lab = augment.synthesize_tumours(jax.random.key(1), image, lab)
        np.testing.assert_array_equal(np.asarray(same_img), np.asarray(image))
        np.testing.assert_array_equal(np.asarray(same_lab), np.asarray(lab))
    image, label = _case()
    bright = jnp.where(label == 2, 0.60, image)                 # hyperdense: d < 0
    out = augment.synthesize_tumours(jax.random.key(1), bright, label)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(bright))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(label))
    # through augment() with p = 1 as in training: still unchanged (flips off)
    cfg = AugmentConfig(tumour_synthesis_p=1.0, flip=False, rotate180=False)
    free_img, free_lab = _case(tumour=False)
    out = augment.augment(jax.random.key(2), free_img, free_lab, cfg)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(free_img))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(free_lab))


def test_blur_size_scales_with_resolution_as_released():
    """A box of resolution // 32 voxels (at least 1): 2 at 64³, 4 at 128³, 16 at 512³."""
    assert [augment.blur_size((r,) * 3) for r in (16, 32, 64, 128, 256, 512)] == [1, 1, 2, 4, 8, 16]
    assert augment.blur_size((256, 256, 100)) == 8 and augment.blur_size((512, 512)) == 16
    # the box itself: normalised, zeros outside, TF SAME placement (k-1)//2 before, k//2 after
    rng = np.random.default_rng(0)
    x = (rng.random((20, 9, 13)) < 0.3).astype(np.float32)
    blur = jax.jit(augment._blur, static_argnums=1)
    for k in (1, 2, 3, 4, 5):
        want = x.copy()
        for ax in range(3):
            p = [(0, 0)] * 3
            p[ax] = ((k - 1) // 2, k // 2)
            xp = np.pad(want, p)
            want = sum(np.take(xp, np.arange(j, j + x.shape[ax]), axis=ax) for j in range(k)) / k
        np.testing.assert_allclose(np.asarray(blur(jnp.asarray(x), k)), want, atol=1e-5)
    # in a synthesis, the width of the soft edge grows with the resolution: a 64³ case has
    # partial values (0 < blurred < 1) on the tumour edge, a 32-voxel one (k = 1) has none
    for r, soft in ((32, False), (64, True)):      # blur_size follows the longest axis
        img, lab = _case((r, 28, 20))
        out, _ = jax.jit(augment.synthesize_tumours, static_argnums=3)(
            jax.random.key(0), img, lab, (0.1, 0.1))
        change = np.abs(np.asarray(out) - np.asarray(img))[np.asarray(lab) >= 1]
        d = float(augment.liver_tumour_difference(img, lab))
        partial = (change > 1e-4 * d) & (np.abs(change - d) > 1e-4 * d)
        assert partial.any() == soft, (r, partial.sum())


def test_contrast_is_measured_in_the_units_the_network_sees():
    """The same HU case under two HU windows and the KiTS z-score: the darkening of a synthetic
    tumour core is 1.15 × (liver − tumour) in each one's units (no 40 HU default, no HU)."""
    from hrseg.config import DataConfig
    from hrseg.data import dataset
    _, label = _case((24, 28, 20))
    hu = np.where(np.asarray(label) == 1, 100.0, np.where(np.asarray(label) == 2, 60.0, -100.0))
    for cfg, per_hu in ((DataConfig(hu_window=(-512.0, 512.0)), 1 / 1024),
                        (DataConfig(hu_window=(-150.0, 250.0)), 1 / 400),
                        (DataConfig(preprocess="kits", resample="native"), 1 / 76.9)):
        image = jnp.asarray(dataset.network_units(hu, cfg))
        d = float(augment.liver_tumour_difference(image, label))
        assert d == pytest.approx(1.15 * 40 * per_hu, rel=1e-4)
        out, new = augment.synthesize_tumours(jax.random.key(3), image, label)
        core = (np.asarray(new) == 2) & (np.asarray(label) == 1)      # new tumour in liver
        drop = np.asarray(image)[core] - np.asarray(out)[core]
        assert drop.max() == pytest.approx(d, rel=1e-4)              # k = 1 here: the full d


def test_changes_stay_in_the_liver_even_where_the_released_blur_would_leak():
    """Kept difference: at 64 voxels the box (k = 2) reaches past the liver's edge; hrseg keeps every
    voxel outside the liver bit-identical and the labels there 0."""
    img, lab = _case((64, 28, 20))
    out, new = augment.synthesize_tumours(jax.random.key(4), img, lab)
    outside = np.asarray(lab) == 0
    np.testing.assert_array_equal(np.asarray(out)[outside], np.asarray(img)[outside])
    assert (np.asarray(new)[outside] == 0).all()
    blurred = np.asarray(augment._blur(jnp.asarray(np.asarray(new) == 2)))
    assert (blurred[outside] > 0).any()          # the released image + d·blur would change these


def test_channels_and_2d_stacks():
    image, label = _case()
    img4 = image[..., None]                                   # (X, Y, Z, 1) as in batches
    out, lab = augment.synthesize_tumours(jax.random.key(2), img4, label)
    ref, ref_lab = augment.synthesize_tumours(jax.random.key(2), image, label)
    np.testing.assert_allclose(np.asarray(out)[..., 0], np.asarray(ref), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(lab), np.asarray(ref_lab))
    stack, lab2d = image[:, :, 8:13], label[:, :, 10]         # 2D: (X, Y, slices), (X, Y)
    out, lab = augment.augment(jax.random.key(3), stack, lab2d, AugmentConfig(tumour_synthesis_p=1))
    assert out.shape == stack.shape and lab.shape == lab2d.shape
    with pytest.raises(ValueError, match="trailing channels"):
        augment.synthesize_tumours(jax.random.key(0), image[:-1], label)


def test_flip_twice_is_identity_and_keeps_alignment():
    image, label = _case()
    image = label.astype(jnp.float32) / 2 + 0.1 * jnp.arange(label.size).reshape(label.shape)
    flipped = set()
    for s in range(8):
        key = jax.random.key(s)
        fi, fl = augment.flip_rotate(key, image, label)
        back_i, back_l = augment.flip_rotate(key, fi, fl)
        np.testing.assert_array_equal(np.asarray(back_i), np.asarray(image))
        np.testing.assert_array_equal(np.asarray(back_l), np.asarray(label))
        flipped.add(np.asarray(fi).tobytes())
        # aligned: the flipped image minus the flipped label's part is a flipped ramp, i.e.
        # the image's label-derived part still sits on the label voxel by voxel
        ramp = (np.asarray(fi) - np.asarray(fl) / 2) / 0.1
        assert np.allclose(ramp, np.rint(ramp), atol=1e-2)
    assert len(flipped) > 2
    # rotation alone: either identity or x and y reversed together
    fi, _ = augment.flip_rotate(jax.random.key(5), image, label, flips=False, rotate180=True)
    assert (np.array_equal(fi, image) or np.array_equal(fi, np.asarray(image)[::-1, ::-1]))


def test_jit_equals_eager_and_config_switches():
    image, label = _case((12, 14, 10))
    key = jax.random.key(11)
    for fn in (lambda k, i, lb: augment.synthesize_tumours(k, i, lb), augment.flip_rotate):
        eager = fn(key, image, label)
        jitted = jax.jit(fn)(key, image, label)
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    off = AugmentConfig(tumour_synthesis_p=0.0, flip=False, rotate180=False)
    same = augment.augment(key, image, label, off)
    np.testing.assert_array_equal(np.asarray(same[0]), np.asarray(image))
    always = AugmentConfig(tumour_synthesis_p=1.0, flip=False, rotate180=False)
    _, lab = augment.augment(key, image, label, always)
    assert not np.array_equal(np.asarray(lab), np.asarray(label))
    # raw uint32 keys (jax.random.PRNGKey, as the napari widget uses) work too
    augment.flip_rotate(jax.random.PRNGKey(0), image, label)


def test_split_key_is_how_augment_uses_the_key():
    """The napari widget draws through split_key: same seed, same tumours as training."""
    img, lab = _case()
    key = jax.random.key(5)
    for p in (0.5, 1.0):
        cfg = AugmentConfig(tumour_synthesis_p=p, flip=False, rotate180=False)
        synthesise, k_synth, _ = augment.split_key(key, p)
        want = augment.synthesize_tumours(k_synth, img, lab) if bool(synthesise) else (img, lab)
        got = augment.augment(key, img, lab, cfg)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not bool(augment.split_key(key, 0.0)[0]) and bool(augment.split_key(key, 1.0)[0])
