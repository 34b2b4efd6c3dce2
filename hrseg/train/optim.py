"""The optimizer and its learning-rate schedule, built from ``train`` config keys.

Its own module so that ``hrseg.memory`` can build the optimizer the step carries without
importing the training loop.
"""
from __future__ import annotations

import optax

from hrseg.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Constant ``lr``, times ``lr_decay`` every ``lr_decay_every`` steps (Mesh-TF step decay)."""
    if cfg.lr_decay_every <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.exponential_decay(cfg.lr, transition_steps=cfg.lr_decay_every,
                                   decay_rate=cfg.lr_decay, staircase=True)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then Adafactor (the paper) or Adam on the step-decay schedule."""
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adafactor":
        opt = optax.adafactor(learning_rate=schedule)
    elif cfg.optimizer == "adam":
        opt = optax.adam(learning_rate=schedule)
    else:
        raise ValueError(f"train.optimizer '{cfg.optimizer}' is not one of adafactor, adam")
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt
