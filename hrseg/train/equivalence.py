"""The partitioned model is the unpartitioned model: errors of sharded against one device.

Notebook 02 runs these on fake CPU devices. Two programs per mesh: one 3×3×3 convolution
(``halo.conv`` against ``lax.conv_general_dilated`` with SAME padding) and a whole U-Net (logits
with running statistics, and the gradient of the training loss, whose BatchNorm uses the
*global* batch statistics). Errors are relative to the largest reference value; the probe loss
``sum(sin(y))`` gives every output element a different cotangent. ``collectives`` counts the
communication XLA compiled into a training step (halos are ``collective-permute``s; an
``all-gather`` would mean a device holds more than its block).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from hrseg.parallel import halo, partition
from hrseg.train import step

COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "reduce-scatter", "all-to-all")
MESH_COLUMN = "mesh x·y·z × data"


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (float64), the error relative to the largest reference value."""
    a, b = (np.asarray(t, np.float64) for t in (a, b))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def tree_err(a, b) -> float:
    """The largest ``rel_err`` over matching leaves of two pytrees."""
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def probe(f: Callable) -> Callable:
    """``sum(sin(f(...)))``: a scalar whose cotangent differs for every output element."""
    return lambda *args: jnp.sum(jnp.sin(f(*args)))


def _ref_conv(x, w):  # x (B, X, Y, Z, Cin), w (3, 3, 3, Cin, Cout)
    return lax.conv_general_dilated(x, w, (1, 1, 1), "SAME",
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                    precision=lax.Precision.HIGHEST)


class Comparison:
    """One random batch of shape ``(B, X, Y, Z)``, the references on one device, and ``row(spatial,
    data)``: the errors of the same programs partitioned over that mesh."""

    def __init__(self, net: nnx.Module, batch_shape: Sequence[int], loss_fn: Callable,
                 classes: int = 3, seed: int = 0):
        key_x, key_w, key_y = jax.random.split(jax.random.key(seed), 3)
        self.x = jax.random.normal(key_x, (*batch_shape, 3))
        self.w = jax.random.normal(key_w, (3, 3, 3, 3, 4))
        self.images = jax.random.normal(key_x, (*batch_shape, 1))
        self.labels = jax.random.randint(key_y, tuple(batch_shape), 0, classes)
        self.graphdef, self.params, self.rest = nnx.split(net, nnx.Param, ...)
        self.loss_fn = loss_fn

    @cached_property
    def conv_reference(self):
        """(y, ∂x, ∂w) of the unpartitioned conv under the probe loss."""
        return (_ref_conv(self.x, self.w),
                *jax.grad(probe(_ref_conv), argnums=(0, 1))(self.x, self.w))

    @cached_property
    def unet_reference(self):
        """(logits, ∂params) of the U-Net on one device (backend "none")."""
        return self.unet_outputs(partition.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                                 "none")

    def unet_outputs(self, mesh, backend: str):
        """(logits, gradient of the loss w.r.t. the parameters) of the U-Net on ``mesh``."""
        layout = partition.layout(mesh, backend)
        xs, ys = step.place_batch(layout, self.images, self.labels)
        forward = jax.jit(step.make_forward(self.graphdef, layout))
        logits, _ = forward(self.params, self.rest, xs)
        loss = step.make_loss(self.graphdef, self.loss_fn, layout)
        grads = jax.jit(jax.grad(lambda p: loss(p, self.rest, xs, ys, 1.0)[0]))(self.params)
        return logits, grads

    def conv_errors(self, mesh) -> dict:
        """Errors of ``halo.conv`` under shard_map on ``mesh``: output, ∂x, ∂w."""
        vs = partition.volume_spec()
        conv = partition.spmd(halo.conv, mesh, "halo", (vs, P()), vs)
        xs = partition.shard(mesh, self.x)
        gx, gw = jax.jit(jax.grad(probe(conv), argnums=(0, 1)))(xs, self.w)
        y, ref_gx, ref_gw = self.conv_reference
        return {"conv": rel_err(jax.jit(conv)(xs, self.w), y), "conv ∂x": rel_err(gx, ref_gx),
                "conv ∂w": rel_err(gw, ref_gw)}

    def row(self, spatial: Sequence[int], data: int = 1, unet: bool = True) -> dict:
        """Relative errors on the halo backend over a ``spatial`` × ``data`` mesh (the conv's,
        and with ``unet`` the U-Net's logits and parameter gradients)."""
        mesh = partition.make_mesh(tuple(spatial), data)
        out = {MESH_COLUMN: f"{'·'.join(map(str, spatial))} × {data}", **self.conv_errors(mesh)}
        if unet:
            logits, grads = self.unet_outputs(mesh, "halo")
            ref_logits, ref_grads = self.unet_reference
            out |= {"U-Net logits": rel_err(logits, ref_logits),
                    "U-Net ∂params": tree_err(grads, ref_grads)}
        return out


def worst(rows: Sequence[dict]) -> float:
    """The largest error in rows of ``Comparison.row``."""
    return max(v for r in rows for k, v in r.items() if k != MESH_COLUMN)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Occurrences of each collective (sync or async ``-start``) in compiled HLO text."""
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo_text)) for op in COLLECTIVES}


def collectives(net: nnx.Module, loss_fn: Callable, spatial: Sequence[int], backend: str,
                size: int, optimizer: optax.GradientTransformation | None = None) -> dict:
    """The collectives in the whole training step (forward, loss, backward, optimizer) of
    ``net`` compiled for a ``spatial`` mesh and one ``size``³ volume from abstract inputs
    (nothing allocated)."""
    optimizer = optimizer or optax.adam(1e-3)
    graphdef, state = step.init_state(net, optimizer)
    mesh = partition.make_mesh(tuple(spatial), devices=jax.devices()[:int(np.prod(spatial))])
    layout = partition.layout(mesh, backend)
    train_step = step.make_train_step(graphdef, optimizer, loss_fn, layout)
    args = step.abstract_inputs(state, layout, (1, size, size, size, 1))
    return {"backend": backend, **count_collectives(train_step.lower(*args).compile().as_text())}
