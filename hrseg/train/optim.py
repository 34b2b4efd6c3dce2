"""The optimizer and its learning-rate schedule, built from ``train`` config keys.

Its own module so that ``hrseg.memory`` can build the optimizer the step carries without
importing the training loop.

Schedules (``train.schedule``):

* ``step`` — constant ``lr``, times ``lr_decay`` every ``lr_decay_every`` steps (the released
  Mesh-TF code's step decay; ``lr_decay_every: 0`` = constant);
* ``plateau`` — ``lr`` times ``lr_decay`` whenever the training loss, averaged over an epoch
  (``epoch_steps`` steps), has not decreased (relative tolerance 1e-4, PyTorch's
  ReduceLROnPlateau default) for ``plateau_patience`` epochs — Wang et al.'s "reduce the
  learning rate by 0.3 when training loss has stopped decreasing for 50 epochs"
  (optax.contrib.reduce_on_plateau, fed the step's loss as ``value``; a skipped fp16 step
  leaves it untouched).
"""
from __future__ import annotations

import math

import jax
import optax
from optax import contrib

from hrseg.config import TrainConfig

SCHEDULES = ("step", "plateau")
PLATEAU_RTOL = 1e-4


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The step-indexed part of the schedule: constant ``lr``, times ``lr_decay`` every
    ``lr_decay_every`` steps (``schedule: plateau`` starts from the constant ``lr``)."""
    if cfg.lr_decay_every <= 0 or cfg.schedule == "plateau":
        return optax.constant_schedule(cfg.lr)
    return optax.exponential_decay(cfg.lr, transition_steps=cfg.lr_decay_every,
                                   decay_rate=cfg.lr_decay, staircase=True)


def epoch_steps(cfg: TrainConfig, train_cases: int) -> int:
    """Steps in one epoch: ``train.epoch_steps``, or (0) the training volumes / batch."""
    return cfg.epoch_steps or max(1, math.ceil(train_cases / cfg.batch))


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping, then Adafactor (the paper) or Adam on the schedule; with
    ``schedule: plateau`` the updates are scaled by reduce_on_plateau, whose ``update`` wants
    the loss (``value=``; step.make_train_step passes it to every ExtraArgs optimizer)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule '{cfg.schedule}' is not one of {', '.join(SCHEDULES)}")
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adafactor":
        opt = optax.adafactor(learning_rate=schedule)
    elif cfg.optimizer == "adam":
        opt = optax.adam(learning_rate=schedule)
    else:
        raise ValueError(f"train.optimizer '{cfg.optimizer}' is not one of adafactor, adam")
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(opt)
    if cfg.schedule == "plateau":
        parts.append(contrib.reduce_on_plateau(
            factor=cfg.lr_decay, patience=cfg.plateau_patience, rtol=PLATEAU_RTOL,
            accumulation_size=steps_per_epoch))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def plateau_scale(opt_state) -> float:
    """The factor reduce_on_plateau has reached (1.0 without a plateau schedule)."""
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, contrib.ReduceLROnPlateauState))
        if isinstance(s, contrib.ReduceLROnPlateauState)]
    return float(found[0].scale) if found else 1.0


def learning_rate(cfg: TrainConfig, opt_state, step: int) -> float:
    """The learning rate of step ``step``: the schedule's, times the plateau factor."""
    lr = float(make_schedule(cfg)(step))
    return lr * plateau_scale(opt_state) if cfg.schedule == "plateau" else lr
