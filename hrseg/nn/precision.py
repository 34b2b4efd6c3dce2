"""Precision policies: which dtype parameters live in, which one the convolutions run in.

Parameters always stay float32 (the optimizer updates them there); the model casts inputs and
kernels to ``compute_dtype`` and computes normalization statistics in float32 (halo.moments),
so only the activations shrink. Logits come back float32 for the loss.

``fp16`` has 5 exponent bits: small gradients underflow, so ``loss_scaling`` tells the
training step (step.make_train_step) to multiply the loss by a dynamic scale and to skip steps
whose gradients are not finite (the pattern of flax's DynamicScale).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp


@dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: jnp.dtype      # storage dtype of parameters (and of their gradients)
    compute_dtype: jnp.dtype    # activations and conv kernels inside the step
    loss_scaling: bool          # multiply the loss by a dynamic scale (fp16 only)

    @property
    def compute_bytes(self) -> int:
        return jnp.dtype(self.compute_dtype).itemsize


POLICIES = {
    "fp32": Policy("fp32", jnp.float32, jnp.float32, False),
    "bf16": Policy("bf16", jnp.float32, jnp.bfloat16, False),
    "fp16": Policy("fp16", jnp.float32, jnp.float16, True),
}


def policy(name: str | Policy) -> Policy:
    """``"fp32"`` | ``"bf16"`` | ``"fp16"`` -> :class:`Policy` (a Policy passes through)."""
    if isinstance(name, Policy):
        return name
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"precision '{name}' is not one of {sorted(POLICIES)}") from None
