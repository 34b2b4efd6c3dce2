"""step.py: the three backends take the same training steps; the halo step has no all-gather."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hrseg.parallel import halo, partition
from hrseg.train import step


class TinyNet(nnx.Module):
    """conv -> BN (global batch stats) -> pool -> conv -> k2s2 up -> concat -> 1x1 head."""

    def __init__(self, rngs, c=4, k=3):
        init = nnx.initializers.lecun_normal()
        self.w1 = nnx.Param(init(rngs.params(), (3, 3, 3, 1, c)))
        self.w2 = nnx.Param(init(rngs.params(), (3, 3, 3, c, 2 * c)))
        self.up = nnx.Param(init(rngs.params(), (2, 2, 2, 2 * c, c)))
        self.head = nnx.Param(init(rngs.params(), (1, 1, 1, 2 * c, k)))
        self.mean = nnx.BatchStat(jnp.zeros((c,)))

    def __call__(self, x, train):
        h = halo.conv(x, self.w1[...])
        m, v = halo.moments(h)
        if train:
            self.mean[...] = 0.9 * self.mean[...] + 0.1 * m.reshape(-1)
        h = jax.nn.leaky_relu((h - m) * jax.lax.rsqrt(v + 1e-5), 0.1)
        d = jax.nn.relu(halo.conv(halo.max_pool(h), self.w2[...]))
        u = jnp.concatenate([h, halo.conv_transpose(d, self.up[...])], -1)
        return halo.conv(u, self.head[...]).astype(jnp.float32)


def ce(logits, labels):
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, labels[..., None], -1)
    return -halo.psum(jnp.sum(picked)) / halo.psum(jnp.float32(labels.size))


def _run(backend, spatial, data, steps=3):
    layout = partition.layout(partition.make_mesh(spatial, data), backend)
    graphdef, state = step.init_state(TinyNet(nnx.Rngs(0)), optax.adam(1e-2))
    train_step = step.make_train_step(graphdef, optax.adam(1e-2), ce, layout)
    state = step.replicate(layout, state)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 16, 8, 1)))
    y = np.asarray(jax.random.randint(jax.random.key(2), (2, 8, 16, 8), 0, 3))
    losses = []
    for _ in range(steps):
        xs, ys = step.place_batch(layout, x, y)
        state, metrics = train_step(state, xs, ys)
        losses.append(float(metrics["loss"]))
        assert bool(metrics["finite"])
        # true voxels of each region, counted over every shard: liver (>= 1), tumour (== 2)
        assert [int(n) for n in metrics["counts"][:, 2]] == [(y >= 1).sum(), (y == 2).sum()]
    return losses, jax.device_get(state)


def test_backends_agree_over_training_steps():
    ref_losses, ref_state = _run("none", (1, 1, 1), 1)
    for backend, spatial, data in [("halo", (2, 2, 2), 1), ("halo", (1, 2, 2), 2),
                                   ("gspmd", (2, 2, 2), 1)]:
        losses, state = _run(backend, spatial, data)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=f"{backend} {spatial}")
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        # running statistics: the global batch mean, not one shard's
        np.testing.assert_allclose(state.rest["mean"][...], ref_state.rest["mean"][...],
                                   rtol=1e-4, atol=1e-6)
        assert int(state.step) == 3


def _compiled_hlo(backend):
    layout = partition.layout(partition.make_mesh((2, 2, 2)), backend)
    graphdef, state = step.init_state(TinyNet(nnx.Rngs(0)), optax.adam(1e-2))
    fn = step.make_train_step(graphdef, optax.adam(1e-2), ce, layout)
    args = step.abstract_inputs(state, layout, (1, 16, 16, 16, 1))
    return fn.lower(*args).compile().as_text()


def test_halo_step_has_no_all_gather_and_exchanges_halos():
    hlo = _compiled_hlo("halo")
    assert "all-gather" not in hlo
    assert "collective-permute" in hlo      # the halos
    assert "all-reduce" in hlo              # BN statistics, loss, weight gradients


def test_fp16_loss_scaling_skips_nonfinite_step():
    layout = partition.layout(partition.make_mesh((1, 1, 1), devices=jax.devices()[:1]), "none")
    graphdef, state = step.init_state(TinyNet(nnx.Rngs(0)), optax.sgd(0.1), loss_scaling=True)
    fn = step.make_train_step(graphdef, optax.sgd(0.1), ce, layout, loss_scaling=True,
                              donate=False)
    x = np.full((1, 8, 8, 8, 1), np.inf, np.float32)     # poisons loss and gradients
    y = np.zeros((1, 8, 8, 8), np.int32)
    new, metrics = fn(state, *step.place_batch(layout, x, y))
    assert not bool(metrics["finite"])
    assert float(new.loss_scale) == float(state.loss_scale) / 2
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)              # update skipped


@pytest.mark.parametrize("backend", ["halo", "gspmd"])
def test_predict_matches_single_device(backend):
    mesh = partition.make_mesh((2, 2, 2))
    model = TinyNet(nnx.Rngs(0))
    graphdef, state = step.init_state(model, optax.adam(1e-2))
    x = np.asarray(jax.random.normal(jax.random.key(1), (1, 8, 16, 8, 1)))
    one = partition.layout(mesh, "none")
    ref_lab, ref_p = step.make_predict(graphdef, one)(state.params, state.rest, x)
    layout = partition.layout(mesh, backend)
    st = step.replicate(layout, state)
    xs, _ = step.place_batch(layout, x, np.zeros(x.shape[:-1], np.int32))
    lab, p = step.make_predict(graphdef, layout)(st.params, st.rest, xs)
    np.testing.assert_allclose(p, ref_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lab, ref_lab)
