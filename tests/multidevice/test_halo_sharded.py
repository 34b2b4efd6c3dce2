"""Sharded halo ops == the unpartitioned ops (forward and gradients), 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from hrseg.parallel import halo, partition

DN = ("NDHWC", "DHWIO", "NDHWC")
KERNELS = [(1, 1, 1), (3, 3, 3), (5, 5, 5), (3, 3, 1)]


def ref_conv(x, w, strides=(1, 1, 1), groups=1):
    return lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=DN,
                                    feature_group_count=groups,
                                    precision=lax.Precision.HIGHEST)


def ref_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 2, 1), (1, 2, 2, 2, 1), "VALID")


def ref_up(x, w):  # k2s2 transposed conv written as scatter of x[i] @ w[a] to 2i+a
    B, X, Y, Z, _ = x.shape
    out = jnp.zeros((B, 2 * X, 2 * Y, 2 * Z, w.shape[-1]), x.dtype)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                out = out.at[:, a::2, b::2, c::2].set(jnp.einsum("bxyzi,io->bxyzo", x, w[a, b, c]))
    return out


def _loss_of(fn):
    """Scalar with a random-direction cotangent so every output element matters."""
    def loss(*args):
        y = fn(*args)
        r = jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) * 0.37)
        return jnp.sum(y.astype(jnp.float32) * r)
    return loss


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-6)
    assert np.abs(a - b).max() / scale < tol, f"max rel err {np.abs(a - b).max() / scale:.2e}"


MESHES = [((1, 1, 1), 1), ((2, 1, 1), 1), ((1, 2, 4), 1), ((2, 2, 2), 1), ((8, 1, 1), 1),
          ((1, 1, 8), 1), ((2, 2, 1), 2)]


@pytest.mark.parametrize("spatial,data", MESHES)
def test_conv_kernels_forward_and_grads(spatial, data):
    mesh = partition.make_mesh(spatial, data)
    B = 2 if data == 2 else 1
    x = jax.random.normal(jax.random.key(0), (B, 16, 24, 32, 3))
    ws = [jax.random.normal(jax.random.key(i + 1), k + (3, 5)) for i, k in enumerate(KERNELS)]

    def local(x, *ws):  # all kernels in one program: one compile per mesh
        return tuple(halo.conv(x, w) for w in ws)

    vs = partition.volume_spec()
    sharded = partition.spmd(local, mesh, "halo", (vs,) + (P(),) * len(ws), (vs,) * len(ws))
    xs = partition.shard(mesh, x)
    outs = jax.jit(sharded)(xs, *ws)
    for w, out in zip(ws, outs):
        _close(out, ref_conv(x, w), 2e-6)   # float32 round-off of another summation order

    total = _loss_of(lambda x, *ws: jnp.concatenate(sharded(x, *ws), -1))
    total_ref = _loss_of(lambda x, *ws: jnp.concatenate([ref_conv(x, w) for w in ws], -1))
    g = jax.jit(jax.grad(total, argnums=tuple(range(len(ws) + 1))))(xs, *ws)
    g_ref = jax.grad(total_ref, argnums=tuple(range(len(ws) + 1)))(x, *ws)
    for a, b in zip(g, g_ref):
        _close(a, b)


@pytest.mark.parametrize("spatial,data", [((2, 2, 2), 1), ((1, 2, 4), 1), ((2, 2, 1), 2)])
def test_pool_upconv_norm_depthwise_strided(spatial, data):
    mesh = partition.make_mesh(spatial, data)
    x = jax.random.normal(jax.random.key(0), (2, 16, 24, 32, 4))
    w_up = jax.random.normal(jax.random.key(1), (2, 2, 2, 4, 6))
    w_dw = jax.random.normal(jax.random.key(2), (3, 3, 3, 1, 4))    # depthwise
    w_s2 = jax.random.normal(jax.random.key(3), (3, 3, 3, 4, 2))    # stride 2

    def local(x, w_up, w_dw, w_s2):
        mean, var = halo.moments(x, mesh_axes=("data", "x", "y", "z"))
        inorm_m, _ = halo.moments(x, axes=(1, 2, 3), mesh_axes=("x", "y", "z"))
        return (halo.max_pool(x), halo.conv_transpose(x, w_up),
                halo.conv(x, w_dw, feature_group_count=4), halo.conv(x, w_s2, strides=2),
                (x - mean) * lax.rsqrt(var + 1e-5), x - inorm_m)

    def ref(x, w_up, w_dw, w_s2):
        mean, var = x.mean((0, 1, 2, 3), keepdims=True), x.var((0, 1, 2, 3), keepdims=True)
        return (ref_pool(x), ref_up(x, w_up), ref_conv(x, w_dw, groups=4),
                ref_conv(x, w_s2, (2, 2, 2)), (x - mean) * lax.rsqrt(var + 1e-5),
                x - x.mean((1, 2, 3), keepdims=True))

    vs = partition.volume_spec()
    sharded = partition.spmd(local, mesh, "halo", (vs, P(), P(), P()), (vs,) * 6)
    args = (partition.shard(mesh, x), w_up, w_dw, w_s2)
    for a, b in zip(jax.jit(sharded)(*args), ref(x, w_up, w_dw, w_s2)):
        _close(a, b, 1e-5)
    cat = lambda f: _loss_of(lambda *a: jnp.concatenate([o.reshape(-1) for o in f(*a)]))
    g = jax.jit(jax.grad(cat(sharded), argnums=(0, 1, 2, 3)))(*args)
    g_ref = jax.grad(cat(ref), argnums=(0, 1, 2, 3))(x, w_up, w_dw, w_s2)
    for a, b in zip(g, g_ref):
        _close(a, b, 5e-5)


def test_halo_wider_than_shard_uses_several_neighbours():
    # (1, 1, 8) on Z=16: 2 voxels per shard, a 7-wide kernel needs 3 from each side.
    mesh = partition.make_mesh((1, 1, 8))
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16, 2))
    w = jax.random.normal(jax.random.key(1), (1, 1, 7, 2, 3))
    f = partition.spmd(lambda x, w: halo.conv(x, w), mesh, "halo",
                       (partition.volume_spec(), P()), partition.volume_spec())
    _close(jax.jit(f)(partition.shard(mesh, x), w), ref_conv(x, w), 1e-6)


def test_unet_shaped_composition_matches_unsharded():
    """conv -> norm -> pool -> conv -> up -> concat skip -> conv -> 1x1 head, fwd + grads."""
    ks = jax.random.split(jax.random.key(0), 6)
    params = {"c1": jax.random.normal(ks[0], (3, 3, 3, 2, 4)) * 0.3,
              "c2": jax.random.normal(ks[1], (3, 3, 3, 4, 8)) * 0.3,
              "up": jax.random.normal(ks[2], (2, 2, 2, 8, 4)) * 0.3,
              "c3": jax.random.normal(ks[3], (3, 3, 3, 8, 4)) * 0.3,
              "head": jax.random.normal(ks[4], (1, 1, 1, 4, 3)) * 0.3}
    x = jax.random.normal(ks[5], (2, 16, 24, 32, 2))

    def net(p, x, conv, pool, up, moments):
        h = conv(x, p["c1"])
        m, v = moments(h)
        h = jax.nn.leaky_relu((h - m) * lax.rsqrt(v + 1e-5), 0.1)
        d = jax.nn.leaky_relu(conv(pool(h), p["c2"]), 0.1)
        u = jnp.concatenate([h, up(d, p["up"])], -1)
        return conv(jax.nn.leaky_relu(conv(u, p["c3"]), 0.1), p["head"])

    def ref_moments(h):
        return h.mean((0, 1, 2, 3), keepdims=True), h.var((0, 1, 2, 3), keepdims=True)

    ref = lambda p, x: net(p, x, ref_conv, ref_pool, ref_up, ref_moments)
    local = lambda p, x: net(p, x, halo.conv, halo.max_pool, halo.conv_transpose,
                             lambda h: halo.moments(h))
    g_ref = jax.grad(_loss_of(ref), argnums=(0, 1))(params, x)
    for spatial, data in [((2, 2, 2), 1), ((2, 2, 1), 2), ((1, 2, 4), 1)]:
        mesh = partition.make_mesh(spatial, data)
        vs = partition.volume_spec()
        f = partition.spmd(local, mesh, "halo", (P(), vs), vs)
        xs = partition.shard(mesh, x)
        _close(jax.jit(f)(params, xs), ref(params, x), 1e-5)
        g = jax.jit(jax.grad(_loss_of(f), argnums=(0, 1)))(params, xs)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            _close(a, b, 5e-5)


def test_2d_conv_on_xy_mesh():
    mesh = partition.make_mesh((2, 4, 1))
    x = jax.random.normal(jax.random.key(0), (1, 16, 24, 5))
    w = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
    vs = partition.volume_spec(2)
    f = partition.spmd(lambda x, w: halo.conv(x, w), mesh, "halo", (vs, P()), vs)
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=lax.Precision.HIGHEST)
    _close(jax.jit(f)(partition.shard(mesh, x, spatial_ndim=2), w), ref, 1e-6)


def test_data_parallel_equals_spatial_only():
    """(2,2,2)×data 1 and (2,2,1)×data 2 give the same conv+BN gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))

    def local(x, w):
        y = halo.conv(x, w)
        m, v = halo.moments(y)
        return (y - m) * lax.rsqrt(v + 1e-5)

    grads = []
    for spatial, data in [((2, 2, 2), 1), ((2, 2, 1), 2)]:
        mesh = partition.make_mesh(spatial, data)
        vs = partition.volume_spec()
        f = partition.spmd(local, mesh, "halo", (vs, P()), vs)
        grads.append(jax.jit(jax.grad(_loss_of(f), argnums=1))(partition.shard(mesh, x), w))
    _close(grads[0], grads[1], 2e-5)
