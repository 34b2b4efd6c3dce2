"""step.py on one device: fp16 mixed precision as torch.cuda.amp runs it (fp32 master weights,
fp16 compute, dynamic loss scaling that halves and skips on overflow and grows after a run of
finite steps), and the loss handed to an optimizer that wants it (the plateau schedule)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrseg.config import TrainConfig
from hrseg.nn import losses, precision, unet
from hrseg.parallel import partition
from hrseg.train import loop, step
from hrseg.train.optim import make_optimizer, plateau_scale


def _setup(prec="fp16", train=None):
    cfg = dataclasses.replace(unet.preset("tiny"), precision=prec)
    train = train or TrainConfig(optimizer="adam", lr=1e-3, grad_clip=0)
    opt = make_optimizer(train)
    pol = precision.policy(prec)
    graphdef, state = step.init_state(unet.build(cfg, 1, rngs=nnx.Rngs(0)), opt, pol.loss_scaling)
    layout = partition.layout(partition.make_mesh((1, 1, 1), devices=jax.devices()[:1]), "none")
    fn = step.make_train_step(graphdef, opt, losses.dice_ce_wang, layout,
                              loss_scaling=pol.loss_scaling, donate=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 8, 8, 8, 1)).astype(np.float32)
    y = (x[..., 0] > 0.5).astype(np.int32) + (x[..., 0] > 1.2)
    return state, fn, step.place_batch(layout, x, y)


def _same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fp16_policy_is_amp():
    pol = precision.policy("fp16")
    assert (pol.param_dtype, pol.compute_dtype, pol.loss_scaling) == (
        jnp.float32, jnp.float16, True)
    assert not precision.policy("bf16").loss_scaling     # bf16's exponent is float32's


def test_fp16_steps_stay_finite_and_master_weights_stay_fp32():
    state, fn, batch = _setup()
    assert float(state.loss_scale) == step.INITIAL_SCALE
    first = state
    for _ in range(3):
        state, m = fn(state, *batch)
        assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
    assert float(state.loss_scale) == step.INITIAL_SCALE and int(state.good_steps) == 3
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert not _same(state.params, first.params)                       # it did train


def test_fp16_overflow_halves_the_scale_and_skips_the_update():
    state, fn, batch = _setup()
    state, _ = fn(state, *batch)
    huge = state.replace(loss_scale=jnp.float32(2.0 ** 100))   # fp16 gradients overflow
    new, m = fn(huge, *batch)
    assert not bool(m["finite"]) and np.isfinite(float(m["loss"]))  # the loss itself is fine
    assert float(new.loss_scale) == 2.0 ** 99 and int(new.good_steps) == 0
    assert _same(new.params, huge.params) and _same(new.opt_state, huge.opt_state)
    assert _same(new.rest, huge.rest)                          # batch statistics kept too
    assert int(new.step) == int(huge.step) + 1
    assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.float32)}
    # the loop's NaN guard lets a skipped overflow pass, not a scale that fell below 1
    pol = precision.policy("fp16")
    assert loop.overflow_skipped(pol, m)
    assert not loop.overflow_skipped(pol, dict(m, loss_scale=np.float32(0.5)))
    assert not loop.overflow_skipped(pol, dict(m, loss=np.float32(np.nan)))   # not an overflow
    assert not loop.overflow_skipped(precision.policy("bf16"), m)


def test_fp16_scale_grows_after_a_run_of_finite_steps(monkeypatch):
    monkeypatch.setattr(step, "SCALE_PERIOD", 2)       # read when the step is traced
    state, fn, batch = _setup()
    state, _ = fn(state, *batch)
    assert float(state.loss_scale) == step.INITIAL_SCALE and int(state.good_steps) == 1
    state, _ = fn(state, *batch)
    assert float(state.loss_scale) == 2 * step.INITIAL_SCALE and int(state.good_steps) == 0


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_plateau_schedule_gets_the_loss(prec):
    """reduce_on_plateau sees every step's loss: with patience 1 and one step per epoch, the
    second step, whose loss is not below the first's, scales the updates by lr_decay."""
    train = TrainConfig(optimizer="adam", lr=1e-9, grad_clip=0, schedule="plateau",
                        plateau_patience=1, lr_decay=0.3, epoch_steps=1)
    state, fn, batch = _setup(prec, train)
    assert plateau_scale(state.opt_state) == 1.0
    scales = []
    for _ in range(4):   # lr 1e-9: the loss does not move, so it has stopped decreasing
        state, _ = fn(state, *batch)
        scales.append(plateau_scale(state.opt_state))
    assert scales[0] == 1.0 and np.isclose(scales[1], 0.3) and scales[-1] < 0.3
    assert all(np.isclose(s, 0.3 ** round(np.log(s) / np.log(0.3))) for s in scales)
