"""halo.py on one device: the plain ops, and clear errors on bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hrseg.parallel import halo

DN = ("NDHWC", "DHWIO", "NDHWC")


def test_unbound_conv_is_plain_same_conv_odd_shape():
    # bit-exact against XLA's own 3D conv; the CPU formulation is checked in test_cpuconv.py
    x = jax.random.normal(jax.random.key(0), (1, 33, 34, 35, 2))
    for k in [(1, 1, 1), (3, 3, 3), (5, 3, 1)]:
        w = jax.random.normal(jax.random.key(1), k + (2, 3))
        ref = lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=DN)
        np.testing.assert_array_equal(halo.conv(x, w, impl="xla"), ref)


def test_strided_conv_matches_xla_same():
    x = jax.random.normal(jax.random.key(0), (1, 8, 12, 16, 2))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 3))
    ref = lax.conv_general_dilated(x, w, (2, 2, 2), "SAME", dimension_numbers=DN)
    np.testing.assert_allclose(halo.conv(x, w, strides=2), ref, rtol=1e-6, atol=1e-6)


def test_conv_transpose_matches_lax_conv_transpose():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5, 3))
    w = jax.random.normal(jax.random.key(1), (2, 2, 2, 3, 4))
    # lax (and flax's ConvTranspose) apply the kernel unflipped in the dilated-input frame,
    # i.e. our kernel mirrored in space
    ref = lax.conv_transpose(x, w[::-1, ::-1, ::-1], (2, 2, 2), "VALID", dimension_numbers=DN)
    np.testing.assert_allclose(halo.conv_transpose(x, w), ref, rtol=1e-5, atol=1e-5)
    # by hand: output voxel (2i+a, 2j+b, 2k+c) = x[i, j, k] @ w[a, b, c]
    y = halo.conv_transpose(x, w)
    np.testing.assert_allclose(y[1, 3, 4, 9], x[1, 1, 2, 4] @ w[1, 0, 1], rtol=1e-5)
    # the lax form kept for benchmarks computes the same, in 3D and 2D
    np.testing.assert_allclose(halo.conv_transpose_xla(x, w), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(halo.conv_transpose_xla(x[..., 0, :], w[:, :, 0]),
                               halo.conv_transpose(x[..., 0, :], w[:, :, 0]), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("nsp", [2, 3])
def test_conv_transpose_formulations_agree(nsp):
    """The CPU's flattened matmul (impl auto on the CPU, wide) and the einsum (xla): the same
    forward bit for bit; gradients equal up to the weight gradient's summation order."""
    x = jax.random.normal(jax.random.key(2), (2,) + (6, 4, 8)[:nsp] + (5,))
    w = jax.random.normal(jax.random.key(3), (2,) * nsp + (5, 7))
    g = jax.random.normal(jax.random.key(4), (2,) + (12, 8, 16)[:nsp] + (7,))
    out = {}
    for impl in ("xla", "wide"):
        y, vjp = jax.vjp(lambda a, b, impl=impl: halo.conv_transpose(a, b, impl=impl), x, w)
        out[impl] = (y, *vjp(g))
    assert jnp.array_equal(out["xla"][0], out["wide"][0])
    for a, b in zip(out["xla"][1:], out["wide"][1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="conv kernel 'fast'"):
        halo.conv_transpose(x, w, impl="fast")


def test_max_pool_and_2d_ops():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    # 2D pooling of a ramp: the max of each 2×2 block is its bottom-right element
    np.testing.assert_array_equal(halo.max_pool(x)[0, :, :, 0], [[5, 7], [13, 15]])
    w = jax.random.normal(jax.random.key(1), (3, 3, 1, 2))
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(halo.conv(x, w), ref, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 6, 4, 3), (1, 4, 6, 2)])
def test_max_pool_gradient_is_autodiffs_with_ties(shape):
    # integer-valued input: most windows hold several equal maxima; the gradient must go to
    # the first of them in row-major window order, as select-and-scatter does
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape).astype(np.float32))
    dims = (1,) + (2,) * (len(shape) - 2) + (1,)
    ref = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, dims, dims, "VALID")
    y, vjp_ref = jax.vjp(ref, x)
    got, vjp = jax.vjp(halo.max_pool, x)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
    np.testing.assert_array_equal(got, y)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
    assert int(jnp.sum(vjp(jnp.ones_like(g))[0] != 0)) == y.size   # one winner per window


def test_after_changes_neither_values_nor_gradients():
    x, g = jnp.arange(6.0).reshape(2, 3), jnp.full((4,), 7.0)
    np.testing.assert_array_equal(halo.after(x, g), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(halo.after(x, g) ** 2))(x), 2 * x)
    assert halo.after(x.astype(jnp.bfloat16), g).dtype == jnp.bfloat16


def test_moments_are_float32_and_exact():
    x = jnp.asarray([[1.0, 2.0], [3.0, 6.0]], jnp.bfloat16).reshape(1, 2, 2, 1, 1)
    mean, var = halo.moments(x)
    assert mean.dtype == jnp.float32
    np.testing.assert_allclose(mean.ravel(), [3.0])           # (1+2+3+6)/4
    np.testing.assert_allclose(var.ravel(), [3.5])            # (4+1+0+9)/4


def test_halo_exchange_without_mesh_is_zero_padding():
    x = jnp.ones((1, 2, 3, 4, 1))
    y = halo.halo_exchange(x, [(1, 0), 2, (0, 3)])
    assert y.shape == (1, 3, 7, 7, 1)
    assert float(y.sum()) == 24.0 and float(y[0, 0].sum()) == 0.0


@pytest.mark.parametrize("x_shape,w_shape,kwargs,match", [
    ((1, 8, 8, 8, 2), (2, 2, 2, 2, 3), {}, "even size"),
    ((8, 8, 2), (3, 3, 3, 2, 3), {}, "rank 4 or 5"),
    ((1, 8, 8, 8, 2), (3, 3, 2, 3), {}, "does not fit"),
    ((1, 8, 8, 8, 2), (3, 3, 3, 4, 3), {}, "channels"),
    ((1, 9, 8, 8, 2), (3, 3, 3, 2, 3), {"strides": 2}, "not divisible by stride 2"),
])
def test_conv_bad_input_errors(x_shape, w_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        halo.conv(jnp.zeros(x_shape), jnp.zeros(w_shape), **kwargs)


def test_pool_and_transpose_bad_input():
    with pytest.raises(ValueError, match="not divisible by the window"):
        halo.max_pool(jnp.zeros((1, 5, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"must be \(2,\)\*3"):
        halo.conv_transpose(jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((3, 3, 3, 2, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        halo.halo_exchange(jnp.zeros((1, 4, 4, 4, 1)), [(1, -1), 1, 1])
