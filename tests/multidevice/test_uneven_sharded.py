"""Uneven shards (parallel/uneven.py): spatial sizes that pool evenly but do not split evenly
over the devices. The partitioned step pads and masks inside; its loss, gradients, batch
statistics, overlap counts and (cropped) predictions equal the unpartitioned model's on the
unpadded volume. Default shard_map (check_vma=True)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrseg.nn import losses, unet
from hrseg.parallel import partition, uneven
from hrseg.train import step

TINY = unet.preset("tiny")
LOSS = losses.get("dice_ce")

# (name, volume (B, X, Y, Z), spatial mesh, data, levels, model overrides)
CASES = {
    # z = 20 on 2 devices × 2^2: padded to 24; blocks 12 / 6 / 3, the upper ones part padding
    "2x2x2-batch": ((1, 24, 16, 20), (2, 2, 2), 1, 3, {}),
    # 100 slices on 8 devices × 2^2: padded to 128; device 7 holds only padding, device 6
    # one valid voxel of 4 at the deepest level
    "100on8-abn": ((1, 100, 8, 4), (8, 1, 1), 1, 3, {"norm": "inplace_abn"}),
    # 96 slices, 4 poolings, 8 devices: the deepest level has 6 voxels on 8 devices
    "96on8-4pool-group": ((1, 96, 16, 16), (8, 1, 1), 1, 5,
                          {"norm": "group", "norm_groups": 2, "base": 2}),
    # uneven on two axes at once, with a data axis
    "data2-two-axes": ((2, 12, 18, 6), (1, 2, 2), 2, 2, {"block": "compact", "reduction": 2}),
}


def _volume(shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape + (1,))
    y = jax.random.randint(jax.random.key(seed + 1), shape, 0, 3)
    return np.asarray(x), np.asarray(y, np.int32)


def _loss_grads(cfg, layout, x, y):
    """(loss, grads, new batch stats, counts) of one training-mode pass."""
    model = unet.build(cfg, 1, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = step.make_loss(graphdef, LOSS, layout)
    xs, ys = step.place_batch(layout, x, y)
    run = jax.jit(jax.value_and_grad(fn, has_aux=True))
    (_, (loss, new_rest, counts)), grads = run(params, rest, xs, ys, jnp.float32(1.0))
    return loss, grads, new_rest, counts


def _close(ref, out, tol=1e-4):
    for name, a, b in zip(("loss", "grads", "batch stats", "counts"), ref, out):
        scale = max((float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(a)), default=0) + 1e-6
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(v, np.float32), np.asarray(u, np.float32),
                                       atol=tol * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_uneven_halo_equals_unpartitioned(case):
    shape, spatial, data, levels, over = CASES[case]
    cfg = dataclasses.replace(TINY, levels=levels, **over)
    mesh = partition.make_mesh(spatial, data)
    ext = uneven.extent(shape + (1,), spatial, levels - 1)
    assert ext is not None and ext.valid != ext.padded          # really uneven
    x, y = _volume(shape)
    ref = _loss_grads(cfg, partition.layout(mesh, "none"), x, y)
    _close(ref, _loss_grads(cfg, partition.layout(mesh, "halo"), x, y))


def test_uneven_gspmd_equals_unpartitioned():
    shape, spatial, data, levels, over = CASES["2x2x2-batch"]
    cfg = dataclasses.replace(TINY, levels=levels, **over)
    mesh = partition.make_mesh(spatial, data)
    x, y = _volume(shape, seed=3)
    ref = _loss_grads(cfg, partition.layout(mesh, "none"), x, y)
    _close(ref, _loss_grads(cfg, partition.layout(mesh, "gspmd"), x, y))


@pytest.mark.parametrize("backend", ["halo", "gspmd"])
def test_uneven_predict_is_cropped_and_equal(backend):
    shape, spatial, data, levels, over = CASES["100on8-abn"]
    cfg = dataclasses.replace(TINY, levels=levels, **over)
    mesh = partition.make_mesh(spatial, data)
    model = unet.build(cfg, 1, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, _ = _volume(shape, seed=5)
    ref_lab, ref_p = step.make_predict(graphdef, partition.layout(mesh, "none"))(params, rest, x)
    layout = partition.layout(mesh, backend)
    xs = partition.shard(mesh, x)
    lab, p = step.make_predict(graphdef, layout)(params, rest, xs)
    assert p.shape == shape + (cfg.classes,) and lab.shape == shape
    np.testing.assert_allclose(p, ref_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lab, ref_lab)


def test_uneven_train_steps_equal_unpartitioned():
    """Three optimizer steps: parameters, running statistics and overlap counts."""
    import optax
    shape, spatial, data, levels, over = CASES["2x2x2-batch"]
    cfg = dataclasses.replace(TINY, levels=levels, **over)
    mesh = partition.make_mesh(spatial, data)
    x, y = _volume(shape, seed=7)
    out = {}
    for backend in ("none", "halo"):
        layout = partition.layout(mesh, backend)
        graphdef, state = step.init_state(unet.build(cfg, 1, nnx.Rngs(0)), optax.adam(1e-2))
        fn = step.make_train_step(graphdef, optax.adam(1e-2), LOSS, layout)
        state = step.replicate(layout, state)
        counts = []
        for _ in range(3):
            state, metrics = fn(state, *step.place_batch(layout, x, y))
            counts.append(np.asarray(metrics["counts"]))
        out[backend] = (jax.device_get(state), counts)
    (ref, ref_counts), (got, got_counts) = out["none"], out["halo"]
    assert [int(n) for n in got_counts[0][:, 2]] == [(y >= 1).sum(), (y == 2).sum()]
    np.testing.assert_array_equal(np.stack(got_counts), np.stack(ref_counts))
    for a, b in zip(jax.tree.leaves((ref.params, ref.rest)), jax.tree.leaves((got.params,
                                                                              got.rest))):
        if jnp.issubdtype(np.asarray(a).dtype, jnp.floating):
            # Adam divides by sqrt(v): a gradient element near 0 turns fp32 round-off (the halo
            # conv's backward sums its slabs in another order) into up to ~2e-5 after 3 steps;
            # a masking error moves a parameter by a whole step (lr = 1e-2), 100× this tolerance
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_impossible_mesh_is_one_line_error():
    mesh = partition.make_mesh((2, 2, 2))
    # 20 does not pool 3 times: no mesh (and no single device) can run it
    with pytest.raises(ValueError, match=r"^shape \(1, 24, 16, 20, 1\): axis 3 \(mesh axis "
                                         r"'z'\) has size 20, not a multiple of 8 \(2\^3 "
                                         r"poolings; no mesh can run it[^\n]*$"):
        partition.check_divisible((1, 24, 16, 20, 1), mesh, levels=3)
    # a batch of 3 on 2 data devices: every device needs whole samples
    with pytest.raises(ValueError, match=r"^shape \(3, 8, 8, 8\): axis 0 \(mesh axis 'data'\) "
                                         r"has size 3, not a multiple of 2 [^\n]*$"):
        partition.shard(partition.make_mesh((1, 2, 2), 2), np.zeros((3, 8, 8, 8), np.int32))
    # the step itself refuses a size that does not pool, in one line
    cfg = dataclasses.replace(TINY, levels=4)
    graphdef, params, rest = nnx.split(unet.build(cfg, 1, nnx.Rngs(0)), nnx.Param, ...)
    fwd = step.make_forward(graphdef, partition.layout(mesh, "halo"))
    with pytest.raises(ValueError, match=r"^spatial axis 3 has size 20, not a multiple of "
                                         r"2\^3 = 8: the 3 poolings need it \(the "
                                         r"unpartitioned network could not run it either\)"):
        jax.eval_shape(fwd, params, rest, jax.ShapeDtypeStruct((1, 24, 16, 20, 1), jnp.float32))
