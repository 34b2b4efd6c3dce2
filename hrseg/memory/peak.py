"""Real peak bytes of a training step on an accelerator (GPU/TPU), beside the estimate and
XLA's compiled figure.

The allocator's ``memory_stats()["peak_bytes_in_use"]`` is the maximum since the process
started, so it measures one step only as the first big thing a process runs: one measurement
per process, with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` on GPU (else the preallocated pool is
counted). CPU devices keep no such statistics: every function here returns None there without
running anything.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from hrseg.config import ModelConfig, TrainConfig
from hrseg.nn import losses, precision, unet
from hrseg.parallel import partition
from hrseg.train import step
from hrseg.train.optim import make_optimizer


def peak_bytes_in_use(device=None) -> int | None:
    """The device allocator's peak so far, or None where the device keeps no statistics."""
    device = jax.devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def measures_peak(device=None) -> bool:
    """Whether :func:`train_step_peak_bytes` can measure on this device (False on CPU)."""
    return peak_bytes_in_use(device) is not None


def single_device_step(model_cfg: ModelConfig, input_shape, batch: int = 1,
                       in_channels: int = 1, optimizer: str = "adafactor", model_fn=None):
    """``run(n) -> seconds``: ``n`` real training steps of one device on zeros (blocking).

    ``input_shape``: the spatial sizes or ``(B, *spatial, C)``; ``model_fn`` builds another
    network of the same input/output (e.g. a stock flax U-Net). The first call compiles.
    """
    device = jax.devices()[0]
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == model_cfg.dims:
        shape = (batch,) + shape + (in_channels,)                         # (B, *S, C)
    layout = partition.layout(partition.make_mesh((1, 1, 1), 1, devices=[device]), "none")
    pol = precision.policy(model_cfg.precision)
    opt = make_optimizer(TrainConfig(optimizer=optimizer))
    model = model_fn() if model_fn else unet.build(model_cfg, shape[-1])
    graphdef, state = step.init_state(model, opt, pol.loss_scaling)
    fn = step.make_train_step(graphdef, opt, losses.cross_entropy, layout,
                              ndim=model_cfg.dims, loss_scaling=pol.loss_scaling)
    x, y = step.place_batch(layout, np.zeros(shape, np.float32),          # (B, *S, C)
                            np.zeros(shape[:-1], np.int32), model_cfg.dims)  # (B, *S)
    box = [step.replicate(layout, state)]

    def run(n: int = 1) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            box[0], metrics = fn(box[0], x, y)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0

    return run


def train_step_peak_bytes(model_cfg: ModelConfig, input_shape, batch: int = 1,
                          in_channels: int = 1, optimizer: str = "adafactor",
                          model_fn=None, steps: int = 1) -> int | None:
    """Allocator peak after ``steps`` real training steps of one device (zeros as data).

    ``input_shape``: the spatial sizes or ``(B, *spatial, C)``. Returns None on devices
    without memory statistics (CPU) before building anything.
    """
    if not measures_peak():
        return None
    single_device_step(model_cfg, input_shape, batch, in_channels, optimizer, model_fn)(steps)
    return peak_bytes_in_use()
