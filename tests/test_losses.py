"""Losses against hand/numpy computations (the sharded equality is in tests/multidevice)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrseg.nn import losses


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _inputs(shape=(2, 5, 4, 3), k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1.5, shape + (k,)).astype(np.float32), rng.integers(0, k, shape)


def test_generalized_dice_matches_formula():
    logits, labels = _inputs()
    p = _np_softmax(logits.astype(np.float64)).reshape(-1, 3)
    r = np.eye(3)[labels.reshape(-1)]
    w = 1 / r.sum(0) ** 2
    want = 1 - 2 * (w * (r * p).sum(0)).sum() / (w * (r + p).sum(0)).sum()
    got = losses.generalized_dice(jnp.asarray(logits), jnp.asarray(labels))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_generalized_dice_hand_case():
    # 2 voxels, classes 0 and 1, one-hot predictions equal to the labels -> loss 0
    logits = jnp.array([[[50.0, -50.0], [-50.0, 50.0]]])
    labels = jnp.array([[0, 1]])
    assert float(losses.generalized_dice(logits, labels)) == pytest.approx(0.0, abs=1e-6)
    # uniform p = 1/2: each class volume 1, w = 1, Σ r p = 1/2 per class, Σ (r + p) = 2
    # -> 1 - 2 * (0.5 + 0.5) / (2 + 2) = 0.5
    assert float(losses.generalized_dice(jnp.zeros((1, 2, 2)), labels)) == pytest.approx(0.5)


def test_absent_class_gets_the_largest_weight_and_stays_finite():
    logits, labels = _inputs()
    labels = np.where(labels == 2, 1, labels)          # no tumour in the batch
    v, g = jax.value_and_grad(losses.generalized_dice)(jnp.asarray(logits), jnp.asarray(labels))
    assert np.isfinite(float(v)) and np.isfinite(np.asarray(g)).all()
    p = _np_softmax(logits.astype(np.float64)).reshape(-1, 3)
    r = np.eye(3)[labels.reshape(-1)]
    vol = r.sum(0)
    w = np.where(vol > 0, 1 / np.maximum(vol, 1) ** 2, 0)
    w[vol == 0] = w.max()
    want = 1 - 2 * (w * (r * p).sum(0)).sum() / (w * (r + p).sum(0)).sum()
    assert float(v) == pytest.approx(want, rel=1e-5)


def test_weighted_ce_matches_formula_and_uniform_logits_give_log_k():
    logits, labels = _inputs()
    weights = (1.0, 8.0, 16.0)
    logp = np.log(_np_softmax(logits.astype(np.float64)))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    wv = np.asarray(weights)[labels]
    want = (wv * nll).sum() / wv.sum()
    got = losses.weighted_ce(jnp.asarray(logits), jnp.asarray(labels), weights)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # uniform logits: -log(1/3) per voxel whatever the weights -> log 3 = 1.0986
    uniform = losses.weighted_ce(jnp.zeros(logits.shape), jnp.asarray(labels), weights)
    assert float(uniform) == pytest.approx(np.log(3), rel=1e-6)


def test_combined_and_get():
    logits, labels = jnp.asarray(_inputs()[0]), jnp.asarray(_inputs()[1])
    g = losses.generalized_dice(logits, labels)
    w = losses.weighted_ce(logits, labels, (1, 8, 16))
    assert float(losses.combined(logits, labels)) == pytest.approx(float(0.2 * g + 0.8 * w))
    assert float(losses.get("gdice", (1, 8, 16))(logits, labels)) == pytest.approx(float(g))
    assert float(losses.get("wce", (1, 8, 16))(logits, labels)) == pytest.approx(float(w))
    assert float(losses.get("dice_ce", (1, 8, 16))(logits, labels)) == pytest.approx(
        float(0.2 * g + 0.8 * w))
    assert float(losses.get("dice_ce", (1, 8, 16), 0.5)(logits, labels)) == pytest.approx(
        float(0.5 * g + 0.5 * w))   # train.dice_weight
    with pytest.raises(ValueError, match="not one of gdice, wce, dice_ce"):
        losses.get("focal", (1, 8, 16))
    with pytest.raises(ValueError, match="2 class weights for 3"):
        losses.weighted_ce(logits, labels, (1, 8))


def test_low_precision_logits_2d_and_jit():
    logits, labels = _inputs(shape=(2, 6, 6))             # 2D: (B, X, Y, K)
    fn = jax.jit(losses.get("dice_ce", (1, 8, 16)))
    out16 = fn(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    out32 = fn(jnp.asarray(logits), jnp.asarray(labels))
    assert out16.dtype == jnp.float32
    assert float(out16) == pytest.approx(float(out32), rel=2e-2)
    with pytest.raises(ValueError, match="without the class axis"):
        losses.weighted_ce(jnp.asarray(logits), jnp.asarray(labels)[:, :3])


def _perfect_256(tumour: bool):
    """A 256³ volume: liver block, optionally a 0.2 % tumour, and logits equal to the labels."""
    labels = np.zeros((1, 256, 256, 256), np.int32)
    labels[0, 64:192, 48:208, 40:200] = 1
    if tumour:
        labels[0, 100:132, 100:132, 100:132] = 2
    return labels


@pytest.fixture(scope="module")
def perfect_loss():
    @jax.jit
    def loss(labels):
        logits = 20.0 * jax.nn.one_hot(labels, 3, dtype=jnp.float32)        # (1, X, Y, Z, 3)
        return losses.generalized_dice(logits, labels)
    return loss


@pytest.mark.parametrize("tumour", [False, True])
def test_generalized_dice_perfect_prediction_has_no_floor_at_256(perfect_loss, tumour):
    # with EPS added to Σ w (r + p), w = 1/V², the floor was 0.40 at 256³ without a tumour
    labels = _perfect_256(tumour)
    assert float(perfect_loss(jnp.asarray(labels))) < 1e-4
    # uniform predictions are still penalised (the normalisation flattens nothing)
    wrong = jax.jit(lambda lb: losses.generalized_dice(
        jnp.zeros(lb.shape + (3,), jnp.float32), lb))(jnp.asarray(labels))
    assert float(wrong) > 0.5


def test_generalized_dice_is_scale_free():
    # the same picture at 16³ and 64³ (each voxel a 4³ block): the same loss
    logits, labels = _inputs(shape=(1, 16, 16, 16))
    def up(a):
        return np.repeat(np.repeat(np.repeat(a, 4, 1), 4, 2), 4, 3)
    small = losses.generalized_dice(jnp.asarray(logits), jnp.asarray(labels))
    big = losses.generalized_dice(jnp.asarray(up(logits)), jnp.asarray(up(labels)))
    assert float(big) == pytest.approx(float(small), rel=1e-5)


def test_class_counts_are_exact_beyond_2_pow_24():
    labels = np.zeros((2, 256, 256, 257), np.int8)              # 33.7 M voxels > 2²⁴
    labels[1, :, :, :7] = 1
    labels[0, 5, 6, 7] = 2
    got = np.asarray(jax.jit(lambda lb: losses._counts(lb, [0, 1, 2]))(jnp.asarray(labels)))
    np.testing.assert_array_equal(got, np.bincount(labels.reshape(-1), minlength=3))
    assert got.dtype == np.int32


def test_dice_ce_wang_matches_formula():
    """CE (unweighted mean) + 1 − mean over the foreground classes of the batch soft Dice
    (2 Σ p r + 1e-5) / (Σ p + Σ r + 1e-5): nnU-Net's DC_and_CE_loss, Wang et al.'s loss."""
    logits, labels = _inputs()
    p = _np_softmax(logits.astype(np.float64))
    r = np.eye(3)[labels]
    ce = -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))
    dice = [(2 * (p[..., k] * r[..., k]).sum() + 1e-5) / (p[..., k].sum() + r[..., k].sum() + 1e-5)
            for k in (1, 2)]
    want = ce + 1 - np.mean(dice)
    got = losses.get("dice_ce_wang")(jnp.asarray(logits), jnp.asarray(labels))
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(losses.soft_dice(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(
        np.mean(dice), rel=1e-5)
    # a confident perfect prediction: CE -> 0, Dice -> 1, so the loss -> 0
    perfect = jnp.asarray(np.eye(3)[labels] * 30.0, jnp.float32)
    assert float(losses.dice_ce_wang(perfect, jnp.asarray(labels))) < 1e-5
    assert "dice_ce_wang" in losses.NAMES


@pytest.mark.parametrize("name", ["gdice", "wce", "dice_ce", "dice_ce_wang", "ce"])
def test_padding_labelled_ignore_leaves_loss_and_gradients_unchanged(name):
    """A batch padded with IGNORE labels (and arbitrary logits there) has the loss and the
    gradients of the unpadded batch: padding is outside the volume."""
    from hrseg import metrics
    fn = losses.cross_entropy if name == "ce" else losses.get(name)
    logits, labels = _inputs(shape=(2, 6, 5, 4))
    rng = np.random.default_rng(7)
    big = rng.normal(0, 3.0, (2, 8, 7, 4, 3)).astype(np.float32)       # padded on two axes
    big[:, :6, :5] = logits
    lab = np.full((2, 8, 7, 4), metrics.IGNORE, np.int64)
    lab[:, :6, :5] = labels
    want, g_want = jax.value_and_grad(fn)(jnp.asarray(logits), jnp.asarray(labels))
    got, g_got = jax.value_and_grad(fn)(jnp.asarray(big), jnp.asarray(lab))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    np.testing.assert_allclose(np.asarray(g_got)[:, :6, :5], np.asarray(g_want), atol=1e-7)
    assert not np.asarray(g_got)[:, 6:].any() and not np.asarray(g_got)[:, :, 5:].any()


def test_training_counts_skip_padding():
    from hrseg import metrics
    from hrseg.train import step
    rng = np.random.default_rng(3)
    true = rng.integers(0, 3, (1, 6, 5, 4))
    pred = rng.integers(0, 3, (1, 6, 5, 4))
    tp = np.full((1, 8, 5, 4), metrics.IGNORE)
    tp[:, :6] = true
    pp = np.full((1, 8, 5, 4), 2)                       # tumour predicted on all the padding
    pp[:, :6] = pred
    want = np.asarray(step.count_overlap(jnp.asarray(pred), jnp.asarray(true)))
    got = np.asarray(step.count_overlap(jnp.asarray(pp), jnp.asarray(tp)))
    np.testing.assert_array_equal(got, want)
    assert metrics.counts(pp[0], tp[0]) == metrics.counts(pred[0], true[0])
