"""The training and inference steps over a data × spatial mesh, for every backend.

Each takes a ``partition.Layout`` (the run's mesh and backend, decided once). One pure
``TrainState``; one jitted, donated ``train_step(state, images, labels)``. The network runs on
the local shard inside ``jax.shard_map`` ("halo"), or on the global array under plain jit
("gspmd", "none"); the gradient is taken *outside* shard_map. shard_map runs in its default
``check_vma`` mode: a replicated weight's gradient is summed over every shard where the weight
meets the sharded activations (jax's ops and the custom VJPs of halo.py / norm.py alike).

Uneven shapes: a spatial size that pools evenly but does not split evenly over its devices
is padded at its upper end inside the step (parallel/uneven.py: images with zeros, labels
with hrseg.metrics.IGNORE) and the padding is masked, so loss, gradients, batch statistics
and predictions (cropped back) are those of the unpadded volume — on the halo and the gspmd
backend alike (gspmd on the unpadded arrays, left to XLA's own uneven splitting, gave twice
the gradient of a deep conv's kernel on this jax/XLA:CPU).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hrseg import metrics as scores
from hrseg.parallel import halo, partition, uneven
from hrseg.parallel.partition import Layout

# fp16 dynamic loss scaling (torch.cuda.amp.GradScaler, flax's DynamicScale): start at
# INITIAL_SCALE, halve and skip the update on non-finite gradients, grow ×2 after SCALE_PERIOD
# finite steps in a row. A step that overflows even at a scale below MIN_SCALE is no overflow
# any more: the training loop stops there as it does for fp32 / bf16.
INITIAL_SCALE = 2.0 ** 15
SCALE_PERIOD = 2000
MIN_SCALE = 1.0


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
                       loss_scale=jnp.float32(INITIAL_SCALE if loss_scaling else 1.0),
                       good_steps=jnp.zeros((), jnp.int32))
    return graphdef, state


def _merge(graphdef, params, rest) -> nnx.Module:
    # Rebuild the State leaves at the current trace level: Variables carried in from an outer
    # trace (jit around grad) may not be mutated inside, and BatchNorm mutates its statistics.
    params, rest = jax.tree.map(lambda x: x, (params, rest))
    return nnx.merge(graphdef, params, rest)


def _specs(ndim: int):
    return partition.volume_spec(ndim), partition.label_spec(ndim)


def _extent(layout: Layout, graphdef, params, rest, shape, poolings: int | None):
    """The padding (uneven.Extent) a batch of ``shape (B, *S, C)`` needs in the per-shard
    step, or None. ``poolings`` defaults to the model's ``poolings`` attribute (0 if none)."""
    if layout.backend.one_device or all(n == 1 for n in layout.spatial):
        return None  # nothing split: the network's own checks apply
    if poolings is None:
        poolings = getattr(nnx.merge(graphdef, params, rest), "poolings", 0)
    return uneven.extent(shape, layout.spatial[:len(shape) - 2], poolings)


def _crop(layout: Layout, x, ext, spec: P):
    """Padded step output -> the unpadded global shape, split where it splits evenly."""
    if ext is None:
        return x
    x = uneven.crop(x, ext)
    return jax.lax.with_sharding_constraint(
        x, layout.sharding(partition.placement_spec(x.shape, layout.mesh, spec)))


def make_forward(graphdef: nnx.GraphDef, layout: Layout, ndim: int = 3,
                 train: bool = False, poolings: int | None = None) -> Callable:
    """``forward(params, rest, images) -> (logits, new_rest)`` on global arrays (any spatial
    size that pools evenly; ``poolings``: see :func:`_extent`)."""
    vspec, _ = _specs(ndim)

    def local(ext, params, rest, images):  # images (B, X, Y, Z, C) local shard
        model = _merge(graphdef, params, rest)
        with uneven.active(ext):
            logits = model(images, train=train)
        return logits, nnx.state(model, nnx.Not(nnx.Param))

    def forward(params, rest, images):
        ext = _extent(layout, graphdef, params, rest, images.shape, poolings)
        fn = layout.spmd(partial(local, ext), in_specs=(P(), P(), vspec),
                         out_specs=(vspec, P()))
        logits, new_rest = fn(params, rest, layout.constrain(uneven.pad(images, ext), vspec))
        return _crop(layout, logits, ext, vspec), new_rest

    return forward


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


def make_loss(graphdef, loss_fn: Callable, layout: Layout, ndim: int = 3,
              poolings: int | None = None):
    """``loss(params, rest, images, labels, scale) -> (scaled loss, (loss, new_rest, counts))``.

    ``loss_fn(logits, labels)`` must psum its voxel sums (hrseg.nn.losses does), so the loss is
    the global one on every shard; it must leave labels hrseg.metrics.IGNORE out (the padding
    of an uneven shape; hrseg.nn.losses does).
    """
    vspec, lspec = _specs(ndim)

    def local(ext, params, rest, images, labels):
        model = _merge(graphdef, params, rest)
        with uneven.active(ext):
            logits = model(images, train=True)                       # (B, *S, K) float32
        loss = loss_fn(logits, labels)
        counts = count_overlap(jnp.argmax(logits, -1), labels)
        return loss, nnx.state(model, nnx.Not(nnx.Param)), counts

    def loss_and_aux(params, rest, images, labels, scale):
        ext = _extent(layout, graphdef, params, rest, images.shape, poolings)
        fwd = layout.spmd(partial(local, ext), in_specs=(P(), P(), vspec, lspec),
                          out_specs=(P(), P(), P()))
        loss, new_rest, counts = fwd(params, rest,
                                     layout.constrain(uneven.pad(images, ext), vspec),
                                     layout.constrain(uneven.pad(labels, ext, scores.IGNORE),
                                                      lspec))
        return loss * scale, (loss, new_rest, counts)

    return loss_and_aux


def _all_finite(tree) -> jax.Array:
    """One boolean: every float leaf finite (integer counters and RNG keys are skipped)."""
    leaves = [x for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] + [jnp.bool_(True)]))


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn: Callable,
                    layout: Layout, ndim: int = 3,
                    loss_scaling: bool = False, donate: bool = True, jit: bool = True,
                    poolings: int | None = None):
    """``train_step(state, images, labels) -> (state, metrics)``; the state is donated.

    ``metrics``: loss, grad_norm, finite (False = NaN/Inf loss, gradients or new state), loss_scale,
    counts (R, 3) of argmax-vs-label overlap per scored region (count_overlap). A non-finite
    step under fp16 loss scaling is skipped and the scale halved; otherwise the caller must stop
    (train.py does, keeping the last good checkpoint).
    """
    grad_fn = jax.value_and_grad(make_loss(graphdef, loss_fn, layout, ndim, poolings),
                                 has_aux=True)
    vspec, lspec = _specs(ndim)

    def train_step(state: TrainState, images, labels):
        images, labels = layout.constrain(images, vspec), layout.constrain(labels, lspec)
        (_, (loss, rest, counts)), grads = grad_fn(state.params, state.rest, images, labels,
                                                   state.loss_scale)
        grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        extra = ({"value": loss} if isinstance(optimizer, optax.GradientTransformationExtraArgs)
                 else {})   # reduce_on_plateau (train.schedule: plateau) reads the loss
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
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


def make_predict(graphdef, layout: Layout, ndim: int = 3, poolings: int | None = None):
    """``predict(params, rest, images) -> (labels (B, *S) int32, probs (B, *S, K) float32)``."""
    fwd = make_forward(graphdef, layout, ndim, train=False, poolings=poolings)

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
    place = lambda shape, spec: NamedSharding(mesh, partition.placement_spec(shape, mesh, spec))
    images = jax.ShapeDtypeStruct(tuple(batch_shape), image_dtype,
                                  sharding=place(batch_shape, vspec))
    labels = jax.ShapeDtypeStruct(tuple(batch_shape[:-1]), jnp.int32,
                                  sharding=place(batch_shape[:-1], lspec))
    return abs_state, images, labels
