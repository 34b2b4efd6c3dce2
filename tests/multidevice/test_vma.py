"""The per-shard ops under ``jax.shard_map`` as a user calls it — defaults, i.e. ``check_vma=True``
— and with ``check_vma=False``: forward, input gradient and parameter gradients equal the same
ops on the whole array, with ``jax.grad`` taken outside and inside shard_map (8 fake devices).

Under ``check_vma=True`` a custom VJP must return cotangents typed like its inputs: a replicated
weight's gradient summed over the mesh, as jax does for its own ops. Inside shard_map with
``check_vma=False`` the per-shard parameter gradients are not summed: the user psums them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from hrseg.nn import norm
from hrseg.parallel import halo, partition

SHAPE = (2, 8, 8, 8, 4)   # (B, X, Y, Z, C): every shard pools evenly on the meshes below
EPS = 1e-5


def ops(x, p):
    """Every public per-shard op on one activation ``x (B, X, Y, Z, 4)``, by name."""
    mean, var = halo.moments(x)
    B, *S, C = x.shape
    grouped = x.reshape(B, *S, 2, C // 2)                                  # (B, *S, G, C/G)
    gn, _, _ = norm.normalize(grouped, p["g"].reshape(2, 2), p["b"].reshape(2, 2),
                              (1, 2, 3, 5), partition.SPATIAL, EPS)
    return {
        "conv": halo.conv(x, p["w"]),
        "max_pool": halo.max_pool(x),
        "conv_transpose": halo.conv_transpose(x, p["w_up"]),
        "moments": (x - mean) * lax.rsqrt(var + EPS),
        "batch_norm": norm.normalize(x, p["g"], p["b"], (0, 1, 2, 3), partition.AXES, EPS)[0],
        "group_norm": gn.reshape(x.shape),
        "inplace_abn": norm.inplace_abn(x, p["g"], p["b"], EPS, "leaky_relu", 0.1)[0],
    }


def _inputs():
    rng = np.random.default_rng(0)   # NumPy: eager jax.random would compile per shape
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = normal(*SHAPE) * 2.0 + 0.5
    p = {"w": normal(3, 3, 3, 4, 5), "w_up": normal(2, 2, 2, 4, 3),
         "g": jnp.array([1.0, -0.5, 2.0, 0.3]), "b": jnp.array([0.1, 0.0, -0.2, 0.5])}
    # a fixed random cotangent per output, so that every output element matters
    r = {n: normal(*s.shape) for n, s in sorted(jax.eval_shape(ops, x, p).items())}
    return x, p, r


def _loss(x, p, r):
    """Σ_ops Σ out·r over the array it is given (the shard, inside shard_map), and the outputs."""
    out = ops(x, p)
    return sum(jnp.sum(out[n] * r[n]) for n in out), out


@pytest.fixture(scope="module")
def reference():
    """Outputs and gradients of the ops on the whole array (no mesh axis bound: plain ops)."""
    x, p, r = _inputs()
    (dx, dp), out = jax.jit(jax.grad(_loss, argnums=(0, 1), has_aux=True))(x, p, r)
    return (x, p, r), out, dx, dp


def _close(name, a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)
    assert err < tol, f"{name}: max rel err {err:.2e}"


MESHES = [((2, 1, 1), 1), ((2, 2, 2), 1), ((1, 2, 4), 1), ((2, 1, 2), 2)]
# check_vma=True (the default) on every mesh; check_vma=False (what the other multidevice tests
# run, grad outside) on one spatial and one data-parallel mesh; each with grad outside/inside.
CASES = [pytest.param(spatial, data, vma, inside,
                      id=f"{'x'.join(map(str, spatial))}-data{data}-"
                         f"{'check_vma' if vma else 'no_check_vma'}-"
                         f"grad_{'inside' if inside else 'outside'}")
         for vma in (True, False) for spatial, data in MESHES for inside in (False, True)
         if vma or (spatial, data) in (((2, 2, 2), 1), ((2, 1, 2), 2))]


@pytest.mark.parametrize("spatial,data,check_vma,grad_inside", CASES)
def test_ops_under_shard_map_equal_unpartitioned(reference, spatial, data, check_vma,
                                                 grad_inside):
    (x, p, r), out_ref, dx_ref, dp_ref = reference
    mesh = partition.make_mesh(spatial, data)
    vs = partition.volume_spec()
    specs = jax.tree.map(lambda _: vs, r)           # outputs and cotangents: sharded volumes
    mode = {} if check_vma else {"check_vma": False}    # True: shard_map's default, unspelled
    if grad_inside:
        def local(x, p, r):
            (dx, dp), out = jax.grad(_loss, argnums=(0, 1), has_aux=True)(x, p, r)
            if not check_vma:   # per-shard parameter gradients: the user sums them
                dp = lax.psum(dp, partition.AXES)
            return out, dx, dp
        f = jax.shard_map(local, mesh=mesh, in_specs=(vs, P(), specs),
                          out_specs=(specs, vs, P()), **mode)
        out, dx, dp = jax.jit(f)(x, p, r)
    else:
        sharded = jax.shard_map(lambda x, p: ops(x, p), mesh=mesh, in_specs=(vs, P()),
                                out_specs=specs, **mode)

        def loss(x, p):
            out = sharded(x, p)
            return sum(jnp.sum(out[n] * r[n]) for n in out), out
        (dx, dp), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, p)
    for n in out_ref:
        _close(f"forward {n}", out[n], out_ref[n])
    _close("d/dx", dx, dx_ref)
    for n in dp_ref:
        _close(f"d/d{n}", dp[n], dp_ref[n], 5e-5)
