"""parallel/native.py + conv3d.cc: the C++ direct 3D conv equals XLA's conv, values and both
gradients, at the sizes the tool trains (64³ × 32) and at odd ones (partial tiles of z positions
and of output channels for both vector widths, batch 2, anisotropic kernels, 16-bit inputs); the
AVX2 build gives the AVX-512 build's bits; where it cannot be built, hrseg says why and runs the
wide-image formulation with the same results."""
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hrseg.parallel import cpuconv, halo, native

DN = ("NDHWC", "DHWIO", "NDHWC")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _xla(xp, w):
    return lax.conv_general_dilated(xp, w, (1, 1, 1), "VALID", dimension_numbers=DN,
                                    precision="highest")


def test_it_is_built_and_used_here():
    assert native.available(), native.status()
    bits = 512 if native.isa() == "avx512" else 256
    assert native.status().startswith(f"native conv3d: on, {bits}-bit, built ")
    assert cpuconv.direct_here()             # one device: the arrays are local
    x = jnp.ones((1, 6, 6, 6, 4))
    w = jnp.ones((3, 3, 3, 4, 8))
    text = jax.jit(lambda x, w: halo.conv(x, w)).lower(x, w).as_text()
    assert "hrseg_conv3d" in text
    text = jax.jit(lambda x, w: halo.conv(x, w, impl="wide")).lower(x, w).as_text()
    assert "hrseg_conv3d" not in text        # model.conv: wide keeps the 2D-conv formulation


# tiles: AVX2 6 z × 16 outputs, AVX-512 12 × 32
ODD = [
    ((1, 6, 7, 9, 3), (3, 3, 3, 3, 5)),       # z 7: one tile of 6 and one of 1
    ((2, 10, 9, 13, 32), (3, 3, 3, 32, 32)),  # batch 2, z 11 = 6 + 5
    ((1, 5, 8, 6, 4), (3, 1, 5, 4, 20)),      # anisotropic, 20 = 16 + 4 output channels
    ((1, 4, 4, 4, 8), (1, 3, 3, 8, 17)),
    ((2, 9, 8, 7, 16), (3, 2, 5, 16, 4)),     # even kernel height (VALID), z 3
    ((1, 5, 4, 19, 6), (3, 3, 3, 6, 39)),     # z 17 = 12 + 5, 39 = 32 + 7 = 2·16 + 7 outputs
]


@pytest.mark.parametrize("shape,kernel", ODD)
def test_forward_and_weight_gradient_equal_xla(shape, kernel):
    xp = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    y, vjp = jax.vjp(lambda w: _xla(xp, w), w)
    g = jax.random.normal(jax.random.key(2), y.shape)
    assert _rel(jax.jit(native.conv3d)(xp, w), y) < 2e-6
    dw = jax.jit(lambda xp, g: native.conv3d_weight_grad(xp, g, kernel))(xp, g)
    assert _rel(dw, vjp(g)[0]) < 2e-6
    # by hand: one output voxel is the sum over its window
    win = xp[-1, 1:1 + kernel[0], 0:kernel[1], 1:1 + kernel[2]]
    np.testing.assert_allclose(native.conv3d(xp, w)[-1, 1, 0, 1],
                               np.einsum("abcI,abcIO->O", win, w), rtol=1e-5, atol=1e-5)


def test_the_training_size_equals_xla_values_and_gradients():
    """64³ × 32 -> 32, the level-0 conv of the 64³ network: forward, input and weight
    gradients through the custom VJP against XLA's conv (float32 round-off only)."""
    xp = jax.random.normal(jax.random.key(0), (1, 66, 66, 66, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 32, 32)) * 0.06
    ours = jax.jit(jax.vjp(lambda xp, w: cpuconv.valid_conv3d(xp, w, direct=True), xp, w)[1])
    y = cpuconv.valid_conv3d(xp, w, direct=True)
    y_ref, vjp_ref = jax.vjp(_xla, xp, w)
    assert _rel(y, y_ref) < 2e-6
    g = jnp.cos(y_ref)
    dxp, dw = ours(g)
    dxp_ref, dw_ref = vjp_ref(g)
    assert _rel(dxp, dxp_ref) < 5e-6
    assert _rel(dw, dw_ref) < 2e-5    # each a sum of 262 144 float32 terms, in another order


def test_16_bit_inputs_are_widened_and_cast_back():
    xp = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 16)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (3, 3, 3, 16, 16)) * 0.1).astype(jnp.bfloat16)
    y = native.conv3d(xp, w)
    assert y.dtype == jnp.bfloat16
    ref = _xla(xp.astype(jnp.float32), w.astype(jnp.float32)).astype(jnp.bfloat16)
    assert _rel(y, ref) < 1e-2                 # one bfloat16 rounding of the same f32 sums


def test_a_damaged_library_in_the_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("HRSEG_NATIVE_DIR", str(tmp_path))
    path = native._library_path()
    path.write_bytes(b"not a shared library")   # e.g. a disk that filled mid-copy
    native.load_library()
    assert path.read_bytes()[:4] == b"\x7fELF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".conv3d-")]  # no leftovers


def _child(env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from hrseg.parallel import halo, native
        x = jax.random.normal(jax.random.key(0), (1, 6, 7, 5, 4))
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 8))
        auto = jax.jit(lambda x, w: halo.conv(x, w)).lower(x, w).as_text()
        d = float(jnp.abs(halo.conv(x, w) - halo.conv(x, w, impl="xla")).max())
        print(native.status()); print("custom call" if "hrseg_conv3d" in auto else "wide", d)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HRSEG_NATIVE_DIR": str(tmp_path / "nc"),
           **env_extra}
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_without_a_compiler_it_says_why_and_runs_the_wide_formulation(tmp_path):
    r = _child({"CXX": "/bin/false"}, tmp_path)
    assert r.returncode == 0, r.stderr
    status, used = r.stdout.strip().splitlines()[-2:]
    assert status.startswith("native conv3d: off, /bin/false could not build conv3d.cc")
    assert used.startswith("wide ") and float(used.split()[1]) < 1e-4
    assert not list((tmp_path / "nc").iterdir())          # nothing half-written left behind


def test_hrseg_native_0_turns_it_off(tmp_path):
    r = _child({"HRSEG_NATIVE": "0"}, tmp_path)
    assert r.returncode == 0, r.stderr
    status, used = r.stdout.strip().splitlines()[-2:]
    assert status == "native conv3d: off, HRSEG_NATIVE=0" and used.startswith("wide ")
    assert not (tmp_path / "nc").exists()                 # not even built


@pytest.mark.parametrize("shape,kernel,pads", [
    ((1, 10, 9, 13, 8), (3, 3, 3, 8, 32), ((1, 1), (1, 1), (1, 1))),   # SAME, z 13 = 12 + 1
    ((2, 5, 6, 30, 5), (3, 3, 3, 5, 37), ((2, 2), (2, 2), (2, 2))),    # the input gradient's k-1
    ((1, 7, 8, 9, 4), (3, 1, 5, 4, 20), ((1, 0), (0, 0), (2, 2))),     # uneven, anisotropic
    ((1, 2, 3, 2, 3), (3, 3, 3, 3, 3), ((2, 2), (2, 2), (2, 2))),      # more padding than input
])
def test_padding_read_in_place_equals_the_padded_copy(shape, kernel, pads):
    """conv3d(x, w, pads) skips the tap rows in the padding and stages the z edges with zeros:
    the same bits as the conv of the padded copy."""
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    y = jax.jit(lambda x, w: native.conv3d(x, w, pads))(x, w)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    np.testing.assert_array_equal(y, jax.jit(native.conv3d)(xp, w))
    assert _rel(y, _xla(xp, w)) < 2e-6
    with pytest.raises(ValueError, match="non-negative"):
        native.conv3d(x, w, ((1, -1), (0, 0), (0, 0)))


def test_a_bad_isa_setting_says_so_and_runs_the_wide_formulation(tmp_path):
    r = _child({"HRSEG_NATIVE_ISA": "sse9"}, tmp_path)
    assert r.returncode == 0, r.stderr
    status, used = r.stdout.strip().splitlines()[-2:]
    assert status.startswith("native conv3d: off, HRSEG_NATIVE_ISA='sse9': expected one of")
    assert used.startswith("wide ")


def _isa_results() -> list:
    """Forward and weight gradient of the odd cases and one 32³ × 32 block, as numpy arrays."""
    out = []
    for i, (shape, kernel) in enumerate(ODD + [((1, 34, 34, 34, 32), (3, 3, 3, 32, 32))]):
        xp = jax.random.normal(jax.random.key(i), shape)
        w = jax.random.normal(jax.random.key(100 + i), kernel)
        y = jax.jit(native.conv3d)(xp, w)
        g = jax.random.normal(jax.random.key(200 + i), y.shape)
        dw = jax.jit(lambda xp, g, k=kernel: native.conv3d_weight_grad(xp, g, k))(xp, g)
        out += [np.asarray(y), np.asarray(dw)]
    return out


@pytest.mark.skipif(native.isa() != "avx512", reason="this CPU has no AVX-512: one build only")
def test_the_avx2_build_gives_the_avx512_builds_bits(tmp_path):
    """Each output sums its terms in the same order at either vector width: a run moved to a
    CPU without AVX-512 (or resumed there) repeats its numbers bit for bit."""
    here = _isa_results()
    child = textwrap.dedent(f"""
        import pickle, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import test_native_conv as t
        print(t.native.status())
        pickle.dump(t._isa_results(), open({str(tmp_path / "avx2.pkl")!r}, "wb"))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HRSEG_NATIVE_ISA": "avx2",
           "HRSEG_NATIVE_DIR": str(tmp_path / "nc")}
    r = subprocess.run([sys.executable, "-c", child], check=False, capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "native conv3d: on, 256-bit" in r.stdout, r.stdout
    there = pickle.loads((tmp_path / "avx2.pkl").read_bytes())
    assert len(there) == len(here) == 2 * (len(ODD) + 1)
    for a, b in zip(here, there):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_the_weight_gradient_is_the_same_bits_on_every_call():
    """Its partial sums are fixed parts of the rows added in a fixed order, whichever thread of
    the pool ran a part (a resumed run repeats its steps bit for bit)."""
    xp = jax.random.normal(jax.random.key(0), (1, 34, 34, 34, 16))
    g = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 16))
    f = jax.jit(lambda xp, g: native.conv3d_weight_grad(xp, g, (3, 3, 3, 16, 16)))
    first = np.asarray(f(xp, g))
    for _ in range(8):
        np.testing.assert_array_equal(np.asarray(f(xp, g)), first)
