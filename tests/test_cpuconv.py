"""parallel/cpuconv.py: the wide-image 3D conv equals XLA's, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hrseg.parallel import cpuconv, halo, native

DN = ("NDHWC", "DHWIO", "NDHWC")


def _close(a, b, tol=2e-6):  # fp32 round-off of a different summation order, relative to max
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-6), np.abs(a - b).max()


CASES = [((3, 3, 3), 3, 4), ((5, 3, 1), 3, 4), ((3, 1, 1), 3, 4), ((1, 3, 3), 3, 4),
         ((3, 2, 5), 3, 4), ((3, 3, 3), 16, 4), ((3, 2, 5), 16, 4),
         ((3, 3, 3), 1, 32), ((3, 2, 5), 1, 30), ((3, 3, 3), 2, 54)]


# every case in the wide-image form; the direct conv (tests/test_native_conv.py has its own
# shapes) on one of each kind: cubic, an even kernel height, matmul weight gradient, few channels
@pytest.mark.parametrize("kernel,cin,cout,direct", [c + (False,) for c in CASES] + [
    CASES[i] + (True,) for i in (0, 4, 5, 7)])
def test_valid_conv3d_equals_lax_values_and_gradients(kernel, cin, cout, direct):
    # cin 16: the weight gradient as matmuls (cpuconv.FLAT_WGRAD_MIN_CIN); 3: XLA's;
    # windows no wider than the output (27 · 1 <= 32): the forward as a sum of taps
    assert (cin >= cpuconv.FLAT_WGRAD_MIN_CIN) == (cin == 16)
    assert cpuconv._few_channels(kernel + (cin, cout)) == (cout >= 30)
    xp = jax.random.normal(jax.random.key(0), (2, 9, 8, 7, cin))  # odd, unequal sizes
    w = jax.random.normal(jax.random.key(1), kernel + (cin, cout))
    ref = lambda xp, w: lax.conv_general_dilated(xp, w, (1, 1, 1), "VALID", dimension_numbers=DN)
    assert native.available(), native.status()
    y, vjp = jax.vjp(lambda xp, w: cpuconv.valid_conv3d(xp, w, direct=direct), xp, w)
    y_ref, vjp_ref = jax.vjp(ref, xp, w)
    _close(y, y_ref)
    g = jax.random.normal(jax.random.key(2), y.shape)
    for got, want in zip(vjp(g), vjp_ref(g)):
        _close(got, want)
    # by hand: one output voxel is the sum over its window
    win = xp[1, 2:2 + kernel[0], 3:3 + kernel[1], 1:1 + kernel[2]]
    np.testing.assert_allclose(y[1, 2, 3, 1], np.einsum("abcI,abcIO->O", win, w), rtol=1e-5)


def test_applies_only_to_plain_3d_convs():
    assert cpuconv.applies((3, 3, 3, 4, 4), (1, 1, 1), 1)
    assert not cpuconv.applies((3, 3, 3, 1, 4), (1, 1, 1), 4)     # depthwise
    assert not cpuconv.applies((3, 3, 3, 4, 4), (2, 2, 2), 1)     # strided
    assert not cpuconv.applies((1, 1, 1, 4, 4), (1, 1, 1), 1)     # a matmul
    assert not cpuconv.applies((2, 3, 3, 4, 4), (1, 1, 1), 1)     # even depth kernel
    assert not cpuconv.applies((3, 3, 2, 4, 4), (1, 1, 1), 1)     # even width kernel
    assert cpuconv.applies((1, 3, 3, 4, 4), (1, 1, 1), 1)
    assert not cpuconv.applies((3, 3, 4, 4), (1, 1), 1)           # 2D


def test_the_kernel_is_chosen_per_conv_not_by_a_global():
    w, s = (3, 3, 3, 4, 4), (1, 1, 1)
    assert cpuconv.chosen("auto", w, s, 1) == (jax.default_backend() == "cpu")
    assert cpuconv.chosen("wide", w, s, 1) and not cpuconv.chosen("xla", w, s, 1)
    assert not cpuconv.chosen("wide", (1, 1, 1, 4, 4), s, 1)   # does not apply: XLA's
    with pytest.raises(ValueError, match="conv kernel 'fast' is not one of auto, xla, wide"):
        cpuconv.check_kernel("fast")


def test_memory_figures_build_the_accelerators_conv():
    from hrseg import config
    from hrseg.memory import analytic
    assert analytic.with_precision(config.preset("mtf"), "bf16").conv == "xla"


def test_halo_conv_cpu_path_equals_generic_path():
    x = jax.random.normal(jax.random.key(0), (1, 9, 10, 11, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 5))
    stacked = "tensor<1x11x156x3xf32>"  # (1, X+2, (Y+2)·(Z+2), Cin): the 2D conv's wide image

    def run(impl):
        text = jax.jit(lambda x, w: halo.conv(x, w, impl=impl)).lower(x, w).as_text()
        y, vjp = jax.vjp(jax.jit(lambda x, w: halo.conv(x, w, impl=impl)), x, w)
        return (y, *vjp(jnp.cos(y))), text

    fast, text = run("wide")
    assert stacked in text
    generic, text = run("xla")
    assert stacked not in text
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(generic)):
        _close(a, b, 1e-5)
