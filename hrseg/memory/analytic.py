"""Analytic per-device memory of a training step: what the model code keeps, counted by hand.

``estimate`` counts, for the local shard of every tensor of the network, what the backward pass
keeps (the model code decides this, see layers.py / norm.py):

* every unit output ``y`` (compute dtype) — the next conv, pool, up-sampling or head keeps it;
* per normalization other than in-place ABN: its input (compute dtype) and the activation's
  mask (1 byte); in-place ABN keeps nothing beyond ``y``;
* depthwise outputs, pooled tensors and skip concatenations (inputs of the next conv);
* the float32 logits, log-probabilities and log-softmax shift of the loss;
* with a 16-bit compute dtype: the input and every conv kernel cast to it;

plus float32 parameters, their gradients (twice on a mesh: the all-reduce's input and output),
the optimizer state (``optimizer.init`` on shapes), BatchNorm statistics, the input shard, and
the backward pass's working set (the two largest gradients in flight, and the padded halo
buffers of the largest conv's backward). A level that ``model.gather_below`` runs all-gathered
(parallel/submesh.py) is counted whole on its gathered axes: n× its share. The layer list walks ``UNet.parts()`` — the list the
forward pass runs — and checks that it reached every conv of the model. compiled.py measures
the real step for comparison.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from hrseg.config import ModelConfig, TrainConfig
from hrseg.nn import layers, precision, unet
from hrseg.parallel import partition, submesh, uneven
from hrseg.train.optim import make_optimizer

GiB = 2 ** 30
MASK_BYTES = 1  # the activation's backward keeps a boolean mask


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]   # per-device (local shard)
    itemsize: int            # every Tensor listed is kept for the backward pass

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def activation_bytes(shape, channels: int, dtype) -> int:
    """Bytes of one activation ``(B, *S, channels)``: the paper's 8·512³·64·2 B = 137.4 GB."""
    return math.prod(shape) * channels * jnp.dtype(dtype).itemsize


def mesh_shape(mesh) -> tuple[int, int, int, int]:
    """``(data, sx, sy, sz)`` of a Mesh, ``(sx, sy, sz)``, ``(data, sx, sy, sz)`` or an int
    (that many devices along x)."""
    if hasattr(mesh, "shape") and not isinstance(mesh, tuple):
        return (int(mesh.shape[partition.DATA]),) + partition.spatial_shape(mesh)
    if isinstance(mesh, int):
        return (1, mesh, 1, 1)
    mesh = tuple(int(m) for m in mesh)
    if len(mesh) == 3:
        return (1,) + mesh
    if len(mesh) == 4:
        return mesh
    raise ValueError(f"mesh {mesh}: give a Mesh, (sx, sy, sz) or (data, sx, sy, sz)")


def batch_shape(model_cfg, input_shape, batch, in_channels):
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == model_cfg.dims:
        return (batch or 1,) + shape + (in_channels,)
    if len(shape) == model_cfg.dims + 2:
        return shape
    raise ValueError(f"input_shape {shape}: give the {model_cfg.dims} spatial sizes or "
                     f"(B, *spatial, C)")


def local_shape(shape, ms, ndim, poolings):
    data, *sp = ms
    B, *S, _ = shape
    if B % data:
        raise ValueError(f"batch {B} is not divisible by {data} data-parallel replicas")
    for s in S:
        if s % 2 ** poolings:
            raise ValueError(f"spatial size {s} is not divisible by 2^{poolings} "
                             f"poolings (shape {tuple(S)}, mesh {ms})")
    # an axis that does not split evenly is padded in the step (parallel/uneven.py): its
    # shard is the padded size over the devices
    return (B // data,) + tuple(uneven.padded_size(s, n, poolings) // n
                                for s, n in zip(S, sp[:ndim]))


# --- the tensors of one training step --------------------------------------------------------

def _norm_act(name, na, dt, out):
    """Saved tensors of a NormAct whose output has shape ``out``."""
    if na.norm == "inplace_abn":
        return [Tensor(name, out, dt)]
    extra = [Tensor(name + ".mask", out, MASK_BYTES)]
    if na.norm != "none":
        extra.append(Tensor(name + ".input", out, dt))  # normalize keeps its input
    return extra + [Tensor(name, out, dt)]


def _unit(unit, name, lead, dt, seen):
    """Saved tensors of one layers.Unit whose input has leading dims ``lead = (B, *S)``."""
    out = []
    if unit.depthwise is not None:  # the pointwise conv keeps the depthwise output
        seen.append(unit.depthwise)
        out.append(Tensor(f"{name}.depthwise", lead + (unit.depthwise.kernel.shape[-1],), dt))
    seen.append(unit.conv)
    return out + _norm_act(name, unit.act, dt, lead + (unit.conv.kernel.shape[-1],))


def _block(block, name, lead, dt, seen):
    return [t for i, u in enumerate(block.units) for t in _unit(u, f"{name}.{i}", lead, dt, seen)]


def _convs(model) -> list[tuple[str, nnx.Module]]:
    """Every module of the model that holds a kernel (convs, up-convs, the head)."""
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_graph(model)
            if isinstance(m, (layers.Conv, layers.ConvTranspose))]


def tensors(model, local_batch_shape, dt, grown=None) -> list[Tensor]:
    """The activations one device keeps for the backward pass, in data-flow order.

    Walks ``model.parts()``; a part of an unknown role, or a conv that no part reaches, is an
    error naming it — a new block cannot silently fall out of the estimate. ``grown``: per
    level, per spatial axis, how many devices' blocks one device holds (:func:`gathered`;
    default 1: nothing gathered).
    """
    B, *S, cin = local_batch_shape
    ones = (1,) * len(S)
    grown = list(grown) if grown else [ones] * model.levels

    def lead(level, grow=None):  # (B, *S): the level's block, whole on its gathered axes
        grow = grown[level] if grow is None else grow
        return (B,) + tuple(s // 2 ** level * k for s, k in zip(S, grow))

    # the image is an argument (input_bytes); a cast to a narrower compute dtype is a new buffer
    out = [Tensor("input", lead(0) + (cin,), dt)] if dt != 4 else []
    seen, skips = [], []
    for part in model.parts():
        here = lead(part.level)
        if part.role in ("down", "bottom"):
            out += _block(part.module, part.name, here, dt, seen)
        if part.role == "down":
            skips.append(out[-1].shape[-1])
            if not getattr(model, "conv_pool", False):   # the max-pool's output
                out.append(Tensor(f"{part.name}.pool", lead(part.level + 1) + (skips[-1],), dt))
        elif part.role == "pool":   # 3³ stride-2 unit: keeps its input (the skip), its outputs
            out += _unit(part.module, f"{part.name}.0",
                         lead(part.level + 1, grown[part.level]), dt, seen)
        elif part.role == "up":
            up = part.module.upsample
            if isinstance(up, layers.ResizeConv):
                # the 3³ conv keeps the repeated input, not the coarser output it repeats; the
                # concatenation, not the unit's output, is what the block's first conv keeps
                # (in-place ABN keeps its outputs all the same: its backward inverts them)
                inplace = up.unit.act.norm == "inplace_abn"
                if not inplace:
                    out.pop()
                out.append(Tensor(f"{part.name}.repeated", here + (up.unit.conv.kernel.shape[-2],),
                                  dt))
                out += _unit(up.unit, f"{part.name}.upsample", here, dt, seen)[:None if inplace
                                                                                else -1]
            else:
                seen.append(up)
                if grown[part.level + 1] != grown[part.level]:  # the up-conv keeps its input,
                    # the coarser output taken back to this level's blocks (unet._regather)
                    out.append(Tensor(f"{part.name}.regathered", lead(part.level + 1, grown[
                        part.level]) + (out[-1].shape[-1],), dt))
            out.append(Tensor(f"{part.name}.concat", here + (2 * skips.pop(),), dt))
            out += _block(part.module.block, part.name, here, dt, seen)
        elif part.role == "head":
            seen.append(part.module)
            k = part.module.kernel.shape[-1]
            own = lead(0, ones)  # the loss runs on this device's block (logits scattered)
            out += [Tensor("logits", own + (k,), 4), Tensor("log_probs", own + (k,), 4),
                    Tensor("logits.max", own + (1,), 4)]  # log_softmax keeps its shift
        elif part.role not in ("bottom", "pool"):
            raise ValueError(f"memory estimate: part '{part.name}' has role '{part.role}', "
                             f"which hrseg/memory/analytic.py does not count")
    counted = {id(m) for m in seen}
    missed = [path for path, m in _convs(model) if id(m) not in counted]
    if missed:
        raise ValueError(f"memory estimate: {', '.join(missed)} of the model are in no part "
                         f"that hrseg/memory/analytic.py counts (UNet.parts())")
    if dt != 4:  # every conv keeps its kernel cast to the compute dtype
        n = sum(math.prod(m.kernel.shape) for m in seen)
        out.append(Tensor("kernels.cast", (n,), dt))
    return out


def _feature_maps(acts):
    """The (B, *S, C) activations among ``acts``: not the loss's tensors, kernel casts or masks."""
    return [t for t in acts if len(t.shape) > 2 and not t.name.endswith(".mask")
            and t.name not in ("logits", "log_probs", "logits.max")]


def _halo_staging(acts) -> int:
    """Backward of the largest halo conv (halo._conv_bwd): the re-exchanged padded input (for
    the weight gradient) and the padded input gradient whose margins go back to the
    neighbours — two buffers one voxel wider on each side of every spatial dim (3³ kernels),
    alive beside the workspace's two full-size gradients."""
    big = max(_feature_maps(acts), key=lambda t: t.bytes)
    B, *S, C = big.shape
    return 2 * B * math.prod(s + 2 for s in S) * C * big.itemsize


def gathered(model_cfg: ModelConfig, local, ms, backend: str = "halo"):
    """(mesh axes each level runs all-gathered on, per level per spatial axis the devices'
    blocks one device then holds): ``model.gather_below``'s plan (parallel/submesh.py) for
    an input shard ``local = (B, *S)`` on ``ms = (data, sx, sy, sz)``; only the halo backend
    (shard_map) gathers."""
    sp = tuple(ms[1:1 + model_cfg.dims])
    if not model_cfg.gather_below or not partition.backend(backend).shard_map:
        return [()] * model_cfg.levels, [(1,) * len(sp)] * model_cfg.levels
    plan = submesh.level_plan((*local, 1), model_cfg.levels, model_cfg.gather_below,
                              devices=sp)
    return plan, [tuple(n if a in axes else 1 for a, n in zip(partition.SPATIAL, sp))
                  for axes in plan]


def _tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate(model_cfg: ModelConfig, input_shape, mesh=(1, 1, 1), policy=None,
             optimizer: str = "adafactor", batch: int | None = None, in_channels: int = 1,
             backend: str = "halo") -> dict:
    """Analytic bytes per device of one training step (see the module docstring).

    ``input_shape``: spatial ``(X, Y, Z)`` (with ``batch``) or ``(B, X, Y, Z, C)``; ``mesh``: a
    Mesh, ``(sx, sy, sz)`` or ``(data, sx, sy, sz)``; ``policy``: name or Policy (default: the
    config's). With ``backend="none"`` everything is on one device whatever the mesh.
    """
    pol = precision.policy(policy or model_cfg.precision)
    model_cfg = with_precision(model_cfg, pol.name)
    shape = batch_shape(model_cfg, input_shape, batch, in_channels)
    ms = partition.devices_used(mesh_shape(mesh), backend)
    lead = local_shape(shape, ms, model_cfg.dims, unet.poolings_of(model_cfg))
    model = nnx.eval_shape(lambda: unet.build(model_cfg, shape[-1]))
    params = nnx.state(model, nnx.Param)
    opt_state = jax.eval_shape(make_optimizer(TrainConfig(optimizer=optimizer)).init, params)
    dt = pol.compute_bytes
    plan, grown = gathered(model_cfg, lead, ms, backend)
    acts = tensors(model, lead + (shape[-1],), dt, grown)
    saved = sum(t.bytes for t in acts)
    largest = max(t.bytes for t in _feature_maps(acts))
    split = partition.backend(backend).shard_map and math.prod(ms[1:]) > 1
    halo_bytes = _halo_staging(acts) if split else 0
    p = _tree_bytes(params)
    out = {
        "mesh": ms, "local_shape": lead + (shape[-1],), "policy": pol.name,
        "gathered": plan,  # mesh axes per level (model.gather_below)
        "params": unet.param_count(model), "param_bytes": p,
        "gradient_bytes": p,
        # the gradients' all-reduce over the mesh: its input and its output are both alive
        "allreduce_bytes": p if math.prod(ms) > 1 else 0,
        "optimizer_bytes": _tree_bytes(opt_state),
        "state_bytes": _tree_bytes(nnx.state(model, nnx.Not(nnx.Param))),
        "input_bytes": math.prod(lead) * (shape[-1] * 4 + 4),  # float32 image + int32 labels
        "activation_bytes": saved,
        "workspace_bytes": 2 * largest,
        "halo_bytes": halo_bytes,
        "layers": [t.__dict__ | {"bytes": t.bytes} for t in acts],
    }
    out["total"] = sum(out[k] for k in ("param_bytes", "gradient_bytes", "allreduce_bytes",
                                        "optimizer_bytes", "state_bytes", "input_bytes",
                                        "activation_bytes", "workspace_bytes", "halo_bytes"))
    return out


def with_precision(cfg: ModelConfig, name: str) -> ModelConfig:
    """The model as memory figures count it: in precision ``name``, built with XLA's own conv
    (``model.conv: xla``), what an accelerator runs — not the CPU's wide-image formulation."""
    return dataclasses.replace(cfg, precision=name, conv="xla")
