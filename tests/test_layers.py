"""layers.py + norm.py on one device: the norms against their formulas, in-place ABN's gradients
and saved residuals, block layouts and their parameter counts by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from hrseg.nn import layers, norm

X = jax.random.normal(jax.random.key(0), (2, 6, 8, 10, 4)) * 2.0 + 0.5   # odd-ish shape
W = jax.random.normal(jax.random.key(1), X.shape)


def test_batch_norm_train_eval_and_running_stats():
    na = layers.NormAct(4, "batch", "identity", momentum=0.9, eps=1e-6)
    y = na(X, train=True)
    mean, var = X.mean((0, 1, 2, 3)), X.var((0, 1, 2, 3))
    np.testing.assert_allclose(y, (X - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-5)
    # running statistics: 0.9·(0, 1) + 0.1·(batch mean, biased batch variance)
    np.testing.assert_allclose(na.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(na.var[...], 0.9 + 0.1 * var, rtol=1e-5)
    y_eval = na(X, train=False)  # uses the running statistics, does not update them
    np.testing.assert_allclose(y_eval, (X - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-6),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(na.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,groups", [("group", 2), ("instance", 4)])
def test_group_and_instance_norm_per_sample(kind, groups):
    na = layers.NormAct(4, kind, "relu", groups=2)
    g = X.reshape(2, 6, 8, 10, groups, 4 // groups)
    m = g.mean((1, 2, 3, 5), keepdims=True)
    v = g.var((1, 2, 3, 5), keepdims=True)
    ref = jax.nn.relu(((g - m) / np.sqrt(v + 1e-6)).reshape(X.shape))
    np.testing.assert_allclose(na(X, train=True), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(na(X, train=False), ref, rtol=1e-4, atol=1e-5)


def test_normalize_gradients_match_autodiff():
    gamma, beta = jnp.array([1.0, -0.5, 2.0, 0.3]), jnp.array([0.1, 0.0, -0.2, 0.5])

    def plain(x, g, b):
        m, v = x.mean((0, 1, 2, 3)), x.var((0, 1, 2, 3))
        return jnp.sum(((x - m) / jnp.sqrt(v + 1e-6) * g + b) * W)

    def ours(x, g, b):
        return jnp.sum(norm.normalize(x, g, b, (0, 1, 2, 3), (), 1e-6)[0] * W)
    for r, c in zip(jax.grad(plain, (0, 1, 2))(X, gamma, beta),
                    jax.grad(ours, (0, 1, 2))(X, gamma, beta)):
        np.testing.assert_allclose(c, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "identity"])
def test_inplace_abn_gradients_equal_bn_plus_activation(act):
    gamma, beta = jnp.array([1.0, -0.5, 2.0, 0.3]), jnp.array([0.1, 0.0, -0.2, 0.5])

    def plain(x, g, b):
        # plain BN with scale |γ| + ε, then the activation, through autodiff
        m, v = x.mean((0, 1, 2, 3)), x.var((0, 1, 2, 3))
        z = (x - m) / jnp.sqrt(v + 1e-6) * (jnp.abs(g) + norm.GAMMA_EPS) + b
        return jnp.sum(norm.forward_act(z, act, 0.1) * W)

    def abn(x, g, b):
        return jnp.sum(norm.inplace_abn(x, g, b, 1e-6, act, 0.1)[0] * W)
    np.testing.assert_allclose(abn(X, gamma, beta), plain(X, gamma, beta), rtol=1e-5)
    for r, c in zip(jax.grad(plain, (0, 1, 2))(X, gamma, beta),
                    jax.grad(abn, (0, 1, 2))(X, gamma, beta)):
        np.testing.assert_allclose(c, r, rtol=1e-4, atol=1e-4)


def _residual_bytes(opts):
    """Bytes jax keeps for the backward pass of conv -> NormAct -> conv -> NormAct."""
    block = layers.ConvBlock(4, 8, 2, opts, rngs=nnx.Rngs(0))
    gd, p, rest = nnx.split(block, nnx.Param, ...)

    def f(p, x):
        return jnp.sum(nnx.merge(gd, p, jax.tree.map(lambda a: a, rest))(x, True)
                       .astype(jnp.float32))
    res = saved_residuals(f, p, jnp.zeros((1, 16, 16, 16, 4)))
    return sum(np.prod(a.shape) * a.dtype.itemsize for a, _ in res if a.shape[1:4] == (16,) * 3)


def test_inplace_abn_saves_fewer_residuals():
    act = 16 ** 3 * 8  # elements of one activation
    bn = _residual_bytes(layers.Opts(norm="batch"))
    abn = _residual_bytes(layers.Opts(norm="inplace_abn"))
    bf16_abn = _residual_bytes(layers.Opts(norm="inplace_abn", dtype=jnp.bfloat16))
    # the block input (16³×4 f32); then BN keeps per layer its input (f32) and a bool mask,
    # and the next conv keeps y1; ABN keeps only y1 (which conv 2 needs too) and y2
    x_in = 16 ** 3 * 4 * 4
    assert bn == x_in + 2 * (act * 4 + act * 1) + act * 4
    assert abn == x_in + 2 * act * 4
    assert bf16_abn == (x_in + 2 * act * 4) // 2


def test_inplace_abn_needs_invertible_activation():
    with pytest.raises(ValueError, match="inverts the activation"):
        layers.NormAct(4, "inplace_abn", "relu")
    with pytest.raises(ValueError, match="not one of"):
        layers.NormAct(4, "layer")


def _n_params(module):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_block_layouts_and_parameter_counts_by_hand():
    rngs = nnx.Rngs(0)
    o = layers.Opts(norm="batch", reduction=4)
    # plain 32 -> 64, 2 convs: 27·32·64 + 27·64·64 + 2 BN·(2·64) = 55296 + 110592 + 256
    assert _n_params(layers.ConvBlock(32, 64, 2, o, rngs=rngs)) == 166144
    # compact 32 -> 64, K = 4 (m = 16), 2 convs:
    #   reduce 1³ 32·16 = 512 (+BN 32); 2 × [depthwise 27·16 = 432 + pointwise 16·16 = 256
    #   (+BN 32)] = 1440; restore 16·64 = 1024 (+BN 128)       -> 512+32+1440+1024+128 = 3136
    blk = layers.CompactConvBlock(32, 64, 2, o, rngs=rngs)
    assert _n_params(blk) == 3136
    assert [u.conv.kernel.shape for u in blk.units] == [
        (1, 1, 1, 32, 16), (1, 1, 1, 16, 16), (1, 1, 1, 16, 16), (1, 1, 1, 16, 64)]
    assert blk.units[1].depthwise.kernel.shape == (3, 3, 3, 1, 16)
    # separable first block of the network keeps a full 3³ conv on the CT channel
    sep = layers.ConvBlock(1, 8, 2, layers.Opts(block="separable"), rngs=rngs, first=True)
    assert sep.units[0].depthwise is None and sep.units[1].depthwise is not None
    # no norm: the convs get a bias
    assert layers.Unit(4, 8, layers.Opts(norm="none"), rngs=rngs).conv.bias is not None
    assert layers.Unit(4, 8, o, rngs=rngs).conv.bias is None


def test_blocks_run_2d_and_keep_compute_dtype():
    x = jax.random.normal(jax.random.key(2), (1, 12, 20, 3))
    for block in layers.BLOCKS:
        o = layers.Opts(ndim=2, block=block, norm="batch", dtype=jnp.bfloat16)
        y = layers.ConvBlock(3, 8, 2, o, rngs=nnx.Rngs(0))(x, True)
        assert y.shape == (1, 12, 20, 8) and y.dtype == jnp.bfloat16
    up = layers.UpBlock(8, 4, 1, layers.Opts(ndim=2), rngs=nnx.Rngs(0))
    assert up(jnp.ones((1, 6, 10, 8)), jnp.ones((1, 12, 20, 4)), True).shape == (1, 12, 20, 4)
