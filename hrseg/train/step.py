"""The training and inference steps over a data × spatial mesh, for every backend.

Each takes a ``partition.Layout`` (the run's mesh and backend, decided once). One pure
``TrainState``; one jitted, donated ``train_step(state, images, labels)``. The network runs on
the local shard inside ``jax.shard_map`` ("halo"), or on the global array under plain jit
("gspmd", "none"); the gradient is taken *outside* shard_map. shard_map runs in its default
``check_vma`` mode: a replicated weight's gradient is summed over every shard where the weight
meets the sharded activations (jax's ops and the custom VJPs of halo.py / norm.py alike).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hrseg import metrics as scores
from hrseg.parallel import halo, partition
from hrseg.parallel.partition import Layout

# fp16 dynamic loss scaling (as flax's DynamicScale): grow ×2 after this many finite steps.
SCALE_PERIOD = 2000


class TrainState(struct.PyTreeNode):
    step: jax.Array          # () int32, optimizer steps taken
    params: nnx.State        # nnx.Param leaves (float32)
    rest: nnx.State          # everything else: BatchStat running statistics, rng counters
    opt_state: optax.OptState
    loss_scale: jax.Array    # () float32; 1.0 unless fp16 loss scaling is on
    good_steps: jax.Array    # () int32, finite steps since the scale last changed


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation,
               loss_scaling: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                       opt_state=optimizer.init(params),
                       loss_scale=jnp.float32(2.0 ** 15 if loss_scaling else 1.0),
                       good_steps=jnp.zeros((), jnp.int32))
    return graphdef, state


def _merge(graphdef, params, rest) -> nnx.Module:
    # Rebuild the State leaves at the current trace level: Variables carried in from an outer
    # trace (jit around grad) may not be mutated inside, and BatchNorm mutates its statistics.
    params, rest = jax.tree.map(lambda x: x, (params, rest))
    return nnx.merge(graphdef, params, rest)


def _specs(ndim: int):
    return partition.volume_spec(ndim), partition.label_spec(ndim)


def make_forward(graphdef: nnx.GraphDef, layout: Layout, ndim: int = 3,
                 train: bool = False) -> Callable:
    """``forward(params, rest, images) -> (logits, new_rest)`` on global arrays."""
    vspec, _ = _specs(ndim)

    def local(params, rest, images):  # images (B, X, Y, Z, C) local shard
        model = _merge(graphdef, params, rest)
        logits = model(images, train=train)
        return logits, nnx.state(model, nnx.Not(nnx.Param))

    return layout.spmd(local, in_specs=(P(), P(), vspec), out_specs=(vspec, P()))


def count_overlap(pred, labels):
    """``(R, 3)`` int32 (|P∩T|, |P|, |T|) voxel counts of hrseg.metrics.REGIONS (liver with its
    tumours, tumour), summed over every shard; hrseg.metrics.region_dice turns them into Dice.
    Integer sums: float32 stops counting at 2²⁴ voxels (256³). Padding (scores.IGNORE) is
    not counted."""
    rows = []
    inside = labels != scores.IGNORE                                     # (B, *S) bool
    for label in scores.REGIONS.values():
        p, t = scores.region(pred, label) & inside, scores.region(labels, label)   # (B, *S) bool
        rows.append(jnp.stack([jnp.sum(p & t, dtype=jnp.int32), jnp.sum(p, dtype=jnp.int32),
                               jnp.sum(t, dtype=jnp.int32)]))
    return halo.psum(jnp.stack(rows))


def make_loss(graphdef, loss_fn: Callable, layout: Layout, ndim: int = 3):
    """``loss(params, rest, images, labels, scale) -> (scaled loss, (loss, new_rest, counts))``.

    ``loss_fn(logits, labels)`` must psum its voxel sums (hrseg.nn.losses does), so the loss is
    the global one on every shard.
    """
    vspec, lspec = _specs(ndim)

    def local(params, rest, images, labels):
        model = _merge(graphdef, params, rest)
        logits = model(images, train=True)                           # (B, *S, K) float32
        loss = loss_fn(logits, labels)
        counts = count_overlap(jnp.argmax(logits, -1), labels)
        return loss, nnx.state(model, nnx.Not(nnx.Param)), counts

    fwd = layout.spmd(local, in_specs=(P(), P(), vspec, lspec), out_specs=(P(), P(), P()))

    def loss_and_aux(params, rest, images, labels, scale):
        loss, new_rest, counts = fwd(params, rest, images, labels)
        return loss * scale, (loss, new_rest, counts)

    return loss_and_aux


def _all_finite(tree) -> jax.Array:
    """One boolean: every float leaf finite (integer counters and RNG keys are skipped)."""
    leaves = [x for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] + [jnp.bool_(True)]))


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn: Callable,
                    layout: Layout, ndim: int = 3,
                    loss_scaling: bool = False, donate: bool = True, jit: bool = True):
    """``train_step(state, images, labels) -> (state, metrics)``; the state is donated.

    ``metrics``: loss, grad_norm, finite (False = NaN/Inf loss, gradients or new state), loss_scale,
    counts (R, 3) of argmax-vs-label overlap per scored region (count_overlap). A non-finite
    step under fp16 loss scaling is skipped and the scale halved; otherwise the caller must stop
    (train.py does, keeping the last good checkpoint).
    """
    grad_fn = jax.value_and_grad(make_loss(graphdef, loss_fn, layout, ndim),
                                 has_aux=True)
    vspec, lspec = _specs(ndim)

    def train_step(state: TrainState, images, labels):
        images, labels = layout.constrain(images, vspec), layout.constrain(labels, lspec)
        (_, (loss, rest, counts)), grads = grad_fn(state.params, state.rest, images, labels,
                                                   state.loss_scale)
        grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        # a good step leaves a finite state: batch statistics or optimizer moments can
        # overflow with a finite loss and gradients (lr 1e6), so all of it is checked
        finite = finite & _all_finite((params, rest, opt_state))
        if loss_scaling:
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
            grow = finite & (state.good_steps + 1 >= SCALE_PERIOD)
            new = keep(new, state).replace(
                step=state.step + 1,
                loss_scale=jnp.where(finite, jnp.where(grow, 2.0, 1.0), 0.5) * state.loss_scale,
                good_steps=jnp.where(finite & ~grow, state.good_steps + 1, 0))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite,
                   "loss_scale": state.loss_scale, "counts": counts}
        return new, metrics

    if not jit:
        return train_step
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_predict(graphdef, layout: Layout, ndim: int = 3):
    """``predict(params, rest, images) -> (labels (B, *S) int32, probs (B, *S, K) float32)``."""
    fwd = make_forward(graphdef, layout, ndim, train=False)

    def predict(params, rest, images):
        logits, _ = fwd(params, rest, images)
        return jnp.argmax(logits, -1).astype(jnp.int32), jax.nn.softmax(logits, -1)

    return jax.jit(predict)


def replicate(layout: Layout, tree):
    """Put a pytree (the TrainState) on every device of the layout's mesh."""
    return jax.device_put(tree, layout.sharding(P()))


def place_batch(layout: Layout, images, labels, ndim: int = 3):
    """Host arrays -> global arrays sharded as the backend expects."""
    vspec, lspec = _specs(ndim)
    return layout.shard(images, vspec, ndim), layout.shard(labels, lspec, ndim)


def abstract_inputs(state: TrainState, layout: Layout, batch_shape,
                    ndim: int = 3, image_dtype=jnp.float32):
    """ShapeDtypeStructs (with shardings) of (state, images, labels) for ``.lower()`` — compile
    a step of any size without allocating it. ``batch_shape`` = (B, *S, C)."""
    mesh = layout.mesh
    vspec, lspec = _specs(ndim)
    rep = NamedSharding(mesh, P())
    abs_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                            sharding=rep), state)
    partition.check_divisible(batch_shape, mesh, levels=0, spec=vspec)
    images = jax.ShapeDtypeStruct(tuple(batch_shape), image_dtype,
                                  sharding=NamedSharding(mesh, vspec))
    labels = jax.ShapeDtypeStruct(tuple(batch_shape[:-1]), jnp.int32,
                                  sharding=NamedSharding(mesh, lspec))
    return abs_state, images, labels
