"""layers.py / norm.py inside shard_map on 8 fake devices == the same layer on the whole array:
every norm (global batch statistics, per-sample group/instance statistics) and every block
type, forward and gradients, on a 2×2×2 mesh and on data 2 × 1×2×2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hrseg.nn import layers, norm
from hrseg.parallel import partition

X = jax.random.normal(jax.random.key(0), (2, 8, 12, 16, 4)) * 2.0 + 0.5
W = jax.random.normal(jax.random.key(1), (2, 8, 12, 16, 8))
MESHES = [((2, 2, 2), 1), ((1, 2, 2), 2)]


def _loss_and_grads(module, mesh=None):
    """(output, parameter gradients, new BatchStats) of sum(module(X) * W), sharded if mesh."""
    gd, params, rest = nnx.split(module, nnx.Param, ...)

    def local(p, r, x):
        m = nnx.merge(gd, p, jax.tree.map(lambda a: a, r))
        return m(x, True).astype(jnp.float32), nnx.state(m, nnx.Not(nnx.Param))
    if mesh is not None:
        local = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), partition.volume_spec()),
                              out_specs=(partition.volume_spec(), P()), check_vma=False)

    def loss(p, x):
        y, r = local(p, rest, x)
        return jnp.sum(y * W[..., :y.shape[-1]]), (y, r)
    (_, (y, r)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, X)
    return y, g, r


def _close(a, b, tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = float(jnp.max(jnp.abs(u))) + 1e-6
        np.testing.assert_allclose(np.asarray(v, np.float32), np.asarray(u, np.float32),
                                   atol=tol * scale, rtol=0)


@pytest.mark.parametrize("spatial,data", MESHES)
@pytest.mark.parametrize("kind", ["batch", "inplace_abn", "group", "instance", "none"])
def test_norm_act_sharded_equals_unsharded(kind, spatial, data):
    make = lambda: layers.NormAct(4, kind, "leaky_relu", groups=2) 
    ref = _loss_and_grads(make())
    out = _loss_and_grads(make(), partition.make_mesh(spatial, data))
    for a, b in zip(ref, out):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("block", layers.BLOCKS)
def test_blocks_sharded_equal_unsharded(block):
    opts = layers.Opts(block=block, norm="batch", reduction=2)
    make = lambda: layers.ConvBlock(4, 8, 2, opts, rngs=nnx.Rngs(0))
    ref = _loss_and_grads(make())
    out = _loss_and_grads(make(), partition.make_mesh((2, 2, 2)))
    for a, b in zip(ref, out):
        _close(a, b, 1e-4)


def test_inplace_abn_gradients_sharded_equal_plain_bn_unsharded():
    # the hand-written backward (psum'd Σdz, Σdz·x̂) against autodiff of plain BN + leaky ReLU
    g, b = jnp.array([1.0, -0.5, 2.0, 0.3]), jnp.array([0.1, 0.0, -0.2, 0.5])
    w = W[..., :4]
    mesh = partition.make_mesh((1, 2, 2), 2)
    spec = partition.volume_spec()

    def sharded(x, g, b):
        f = jax.shard_map(lambda x, g, b: norm.inplace_abn(x, g, b, 1e-6, "leaky_relu", 0.1)[0],
                          mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec,
                          check_vma=False)
        return jnp.sum(f(x, g, b) * w)

    def plain(x, g, b):
        return jnp.sum(norm.inplace_abn_reference(x, g, b, 1e-6, "leaky_relu", 0.1)[0] * w)
    ref = jax.grad(plain, (0, 1, 2))(X, g, b)
    out = jax.jit(jax.grad(sharded, (0, 1, 2)))(X, g, b)
    _close(ref, out, 1e-5)
