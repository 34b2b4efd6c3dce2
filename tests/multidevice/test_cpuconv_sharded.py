"""The CPU conv formulation (parallel/cpuconv.py) on a 2×2×2 mesh == the generic XLA conv,
values and gradients: through halo.conv (check_vma off, as partition.spmd runs it), and the
formulation itself under shard_map's default check_vma=True (its custom VJP psums the
replicated weight's gradient over the mesh, as autodiff would)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from hrseg.parallel import cpuconv, halo, partition


def _run(mesh, check_vma, x, w, impl):
    vs = partition.volume_spec()
    conv = jax.shard_map(lambda x, w: halo.conv(x, w, impl=impl), mesh=mesh, in_specs=(vs, P()),
                         out_specs=vs, check_vma=check_vma)
    text = jax.jit(conv).lower(x, w).as_text()
    y, vjp = jax.vjp(jax.jit(conv), x, w)
    return (y, *vjp(jnp.cos(y))), text


def test_sharded_cpu_conv_equals_generic_conv(check_vma=False):
    mesh = partition.make_mesh((2, 2, 2), 1)
    x = partition.shard(mesh, jax.random.normal(jax.random.key(0), (1, 8, 12, 10, 3)))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))
    stacked = "tensor<1x6x56x3xf32>"  # per shard (1, X/2+2, (Y/2+2)·(Z/2+2), Cin): the wide image
    fast, text = _run(mesh, check_vma, x, w, "wide")
    assert stacked in text
    generic, text = _run(mesh, check_vma, x, w, "xla")
    assert stacked not in text
    for a, b in zip(fast, generic):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize("check_vma", [False, True])
def test_halo_conv_runs_the_direct_conv_on_each_shard(check_vma):
    mesh = partition.make_mesh((2, 2, 2), 1)
    x = partition.shard(mesh, jax.random.normal(jax.random.key(0), (1, 8, 12, 10, 16)))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 16, 20))
    direct, text = _run(mesh, check_vma, x, w, "auto")
    assert "hrseg_conv3d" in text and "hrseg_conv3d_weight_grad" not in text  # forward only
    generic, _ = _run(mesh, check_vma, x, w, "xla")
    for a, b in zip(direct, generic):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize("cin,direct", [(3, False), (16, False), (16, True)])
def test_formulation_under_check_vma(cin, direct):
    """cin 3 / 16: the weight gradient by XLA / as matmuls; direct: the C++ conv's custom
    calls on each shard (parallel/native.py), used inside shard_map"""
    mesh = partition.make_mesh((2, 2, 2), 1)
    vs = partition.volume_spec()
    xp = partition.shard(mesh, jax.random.normal(jax.random.key(0), (1, 10, 12, 14, cin)))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, cin, 4))
    ref = lambda xp, w: lax.conv_general_dilated(xp, w, (1, 1, 1), "VALID",
                                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    outs = []
    ours = lambda xp, w: cpuconv.valid_conv3d(xp, w, direct=direct)
    assert cpuconv.direct_here() is False   # outside shard_map: GSPMD's global arrays
    ct = None
    for f in (ref, ours):  # each shard: a VALID conv of its own block
        g = jax.shard_map(f, mesh=mesh, in_specs=(vs, P()), out_specs=vs)  # check_vma=True
        y, vjp = jax.vjp(jax.jit(g), xp, w)
        ct = jnp.cos(y) if ct is None else ct   # one cotangent for both
        outs.insert(0, (y, *vjp(ct)))
    assert outs[0][2].shape == w.shape   # the weight gradient, summed over the 8 shards
    for a, b in zip(*outs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
