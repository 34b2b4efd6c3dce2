"""Losses on a sharded mesh == unsharded (value and gradient), 8 fake CPU devices.

The sharded loss runs as the training step runs it: per shard inside shard_map (via
partition.spmd: shard_map's default check_vma=True), out_specs P(), gradient taken outside shard_map.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hrseg.nn import losses
from hrseg.parallel import partition

MESHES = [((2, 2, 2), 1), ((2, 2, 1), 2), ((1, 1, 1), 8)]


def _inputs(shape=(2, 8, 8, 8), k=3, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(0, 2, shape + (k,)), dtype)
    labels = rng.integers(0, k, shape)
    labels[1] = np.where(labels[1] == 2, 1, labels[1])     # case 2 without tumour
    return logits, jnp.asarray(labels, jnp.int32)


def _sharded(fn, spatial, data):
    mesh = partition.make_mesh(spatial, data)
    return mesh, partition.spmd(fn, mesh, "halo", in_specs=(partition.volume_spec(3),
                                                             partition.label_spec(3)),
                                out_specs=P())


@pytest.mark.parametrize("name", losses.NAMES)
@pytest.mark.parametrize("spatial,data", MESHES)
def test_sharded_loss_and_gradient_equal_unsharded(name, spatial, data):
    fn = losses.get(name, (1.0, 8.0, 16.0))
    logits, labels = _inputs(shape=(data if data > 1 else 2, 8, 8, 8))
    want, want_g = jax.value_and_grad(fn)(logits, labels)
    mesh, sharded = _sharded(fn, spatial, data)
    lg = partition.shard(mesh, logits)
    lb = partition.shard(mesh, labels)
    got, got_g = jax.jit(jax.value_and_grad(sharded))(lg, lb)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(want_g).max()) > 0


def test_sharded_loss_bf16_logits():
    """bf16 logits are computed in float32: sharded and unsharded still agree."""
    fn = losses.get("dice_ce")
    logits, labels = _inputs(dtype=jnp.bfloat16)
    mesh, sharded = _sharded(fn, (2, 2, 2), 1)
    got = jax.jit(sharded)(partition.shard(mesh, logits), partition.shard(mesh, labels))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), float(fn(logits, labels)), rtol=1e-6)


@pytest.mark.parametrize("tumour", [False, True])
def test_sharded_perfect_prediction_has_no_floor_at_256(tumour):
    """256³ on a 2×2×2 mesh: a perfect prediction scores < 1e-4 (no volume-dependent floor)."""
    labels = np.zeros((1, 256, 256, 256), np.int32)
    labels[0, 64:192, 48:208, 40:200] = 1
    if tumour:
        labels[0, 100:132, 100:132, 100:132] = 2
    fn = losses.get("gdice")
    mesh, sharded = _sharded(fn, (2, 2, 2), 1)
    lb = partition.shard(mesh, jnp.asarray(labels))
    logits = jax.jit(lambda lb: 20.0 * jax.nn.one_hot(lb, 3, dtype=jnp.float32))(lb)
    assert float(jax.jit(sharded)(logits, lb)) < 1e-4
