"""optim.py: the step decay as before, Wang et al.'s plateau schedule, the epoch length."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hrseg.config import TrainConfig
from hrseg.train import optim


def test_step_schedule_is_unchanged():
    t = TrainConfig(lr=1e-2, lr_decay=0.3, lr_decay_every=10)
    s = optim.make_schedule(t)
    assert [float(s(i)) for i in (0, 9, 10, 25)] == pytest.approx([1e-2, 1e-2, 3e-3, 9e-4])
    assert optim.learning_rate(t, None, 25) == pytest.approx(9e-4)


def test_plateau_decays_by_0_3_after_patience_epochs_without_a_lower_mean_loss():
    """Epochs of 4 steps; the epoch's mean loss stops decreasing after epoch 2, and after
    ``patience`` = 3 such epochs the scale becomes 0.3 (Wang et al.: ×0.3 after 50 epochs)."""
    t = TrainConfig(optimizer="adam", lr=4e-4, grad_clip=0, schedule="plateau",
                    plateau_patience=3, lr_decay=0.3)
    opt = optim.make_optimizer(t, steps_per_epoch=4)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    losses = [3.0, 2.0] + [2.5] * 4            # per epoch: better, better, then 4 worse
    scales = []
    for loss in losses:
        for _ in range(4):
            _, state = opt.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(loss))
        scales.append(optim.plateau_scale(state))
    assert scales == pytest.approx([1, 1, 1, 1, 0.3, 0.3])
    assert optim.learning_rate(t, state, 100) == pytest.approx(4e-4 * 0.3)
    # the updates are Adam's, scaled: lr 4e-4 × 0.3 for a constant gradient
    upd, _ = opt.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(2.5))
    np.testing.assert_allclose(np.asarray(upd["w"]), -4e-4 * 0.3, rtol=1e-3)


def test_no_plateau_without_the_schedule_and_epoch_length():
    state = optim.make_optimizer(TrainConfig()).init({"w": jnp.ones(2)})
    assert optim.plateau_scale(state) == 1.0
    assert optim.epoch_steps(TrainConfig(batch=2), 99) == 50
    assert optim.epoch_steps(TrainConfig(batch=2, epoch_steps=7), 99) == 7
    assert isinstance(optim.make_optimizer(TrainConfig(schedule="plateau")),
                      optax.GradientTransformationExtraArgs)
    with pytest.raises(ValueError, match="train.schedule"):
        optim.make_optimizer(TrainConfig(schedule="cosine"))
