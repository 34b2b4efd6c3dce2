"""Analytic per-device memory of a training step: what the step keeps, counted by hand.

``tensors`` lists, for the local shard of every tensor of the network, what autodiff saves for
the backward pass (the model code decides this, see layers.py / norm.py) — ``activation_bytes``,
which memory.residuals checks against ``jax.vjp``:

* every unit output ``y`` (compute dtype) — the next conv, pool, up-sampling or head keeps it;
* per normalization other than in-place ABN: its input (compute dtype) and the activation's
  mask (1 byte); in-place ABN keeps nothing beyond ``y``;
* depthwise outputs, pooled tensors and skip concatenations (inputs of the next conv);
* the float32 logits, log-probabilities and log-softmax shift of the loss;
* with a 16-bit compute dtype: the input and every conv kernel cast to it.

``estimate`` turns that into the step's peak, as the compiled step (compiled.py) reaches it:

* arguments: float32 parameters, the optimizer state (``optimizer.init`` on shapes),
  BatchNorm statistics and the input shard (the updated state is donated: outputs alias them);
* the backward pass's peak (:func:`backward_peak`): walking the units from the last, at each
  the tensors saved before it are still kept, less what XLA recomputes instead of keeping
  (:func:`recomputed`: the masks, a nearest up-sampling's repeat), plus the unit's working
  set — the gradients of its conv's output and input, each also in the transposed layout the
  weight gradient's conv reads — plus the parameter gradients already made;
* or, if larger, the update: the gradients (twice on a mesh: the all-reduce's output too).

Compiler effects, named: XLA:CPU computes a 16-bit conv in float32, so the working set is
float32 whatever the compute dtype; its buffer assignment at the peak (read in
docs/design/memory-estimation.md) shows the rest: the widened conv input is the transposed
copy the working set counts, each kernel is kept as its 16-bit cast until its backward, a
recomputed mask is read from the pre-activation kept in the compute dtype, and a unit's own
normalization tensors are consumed before its conv's backward allocates. A GPU's or TPU's
compiler keeps the working set in the compute dtype: ``platform=`` counts the widening for
"cpu" only (accelerator figures are not measured here). The halo exchange adds no buffer of
its own. XLA:CPU's heap also leaves gaps between buffers, which no count of tensors sees:
the rest of the error. A level that
``model.gather_below`` runs all-gathered (parallel/submesh.py) is counted whole on its
gathered axes: n× its share. The layer list walks ``UNet.parts()`` — the list the forward pass
runs — and checks that it reached every conv of the model. benchmarks/memory.py's grid
measures the estimate against the compiled step (benchmarks/results/memory_grid.json).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from hrseg.config import ModelConfig, TrainConfig
from hrseg.memory.backward import (  # noqa: F401  (re-exported: memory.analytic.*)
    GRAD_BYTES,
    PLATFORMS,
    backward_peak,
    grad_bytes,
    platform_of,
    recomputed,
)
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


def _unit(unit, name, lead, dt, seen, steps=None, lead_in=None):
    """Saved tensors of one layers.Unit whose output has leading dims ``lead = (B, *S)``
    (``lead_in``: its input's, if the conv strides). ``steps`` gets the unit's backward step:
    (its output Tensor, the conv's input shape, its output's elements, its parameter count)."""
    out = []
    cin = (unit.conv.kernel.shape[-2] if unit.depthwise is None
           else unit.depthwise.kernel.shape[-1])
    if unit.depthwise is not None:  # the pointwise conv keeps the depthwise output
        seen.append(unit.depthwise)
        out.append(Tensor(f"{name}.depthwise", lead + (unit.depthwise.kernel.shape[-1],), dt))
    seen.append(unit.conv)
    cout = unit.conv.kernel.shape[-1]
    out += _norm_act(name, unit.act, dt, lead + (cout,))
    if steps is not None:
        n = sum(math.prod(m.kernel.shape) for m in (unit.depthwise, unit.conv) if m is not None)
        steps.append((out[-1], tuple(lead_in or lead) + (cin,), math.prod(lead) * cout, n))
    return out


def _block(block, name, lead, dt, seen, steps=None):
    return [t for i, u in enumerate(block.units)
            for t in _unit(u, f"{name}.{i}", lead, dt, seen, steps)]


def _convs(model) -> list[tuple[str, nnx.Module]]:
    """Every module of the model that holds a kernel (convs, up-convs, the head)."""
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_graph(model)
            if isinstance(m, (layers.Conv, layers.ConvTranspose))]


def tensors(model, local_batch_shape, dt, grown=None, steps=None) -> list[Tensor]:
    """The activations one device keeps for the backward pass, in data-flow order.

    Walks ``model.parts()``; a part of an unknown role, or a conv that no part reaches, is an
    error naming it — a new block cannot silently fall out of the estimate. ``grown``: per
    level, per spatial axis, how many devices' blocks one device holds (:func:`gathered`;
    default 1: nothing gathered). ``steps``: a list that gets each unit's backward step
    (:func:`_unit`), in data-flow order.
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
            out += _block(part.module, part.name, here, dt, seen, steps)
        if part.role == "down":
            skips.append(out[-1].shape[-1])
            if not getattr(model, "conv_pool", False):   # the max-pool's output
                out.append(Tensor(f"{part.name}.pool", lead(part.level + 1) + (skips[-1],), dt))
        elif part.role == "pool":   # 3³ stride-2 unit: keeps its input (the skip), its outputs
            out += _unit(part.module, f"{part.name}.0",
                         lead(part.level + 1, grown[part.level]), dt, seen, steps,
                         lead(part.level))
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
                out += _unit(up.unit, f"{part.name}.upsample", here, dt, seen,
                             steps)[:None if inplace else -1]
            else:
                seen.append(up)
                if grown[part.level + 1] != grown[part.level]:  # the up-conv keeps its input,
                    # the coarser output taken back to this level's blocks (unet._regather)
                    out.append(Tensor(f"{part.name}.regathered", lead(part.level + 1, grown[
                        part.level]) + (out[-1].shape[-1],), dt))
            out.append(Tensor(f"{part.name}.concat", here + (2 * skips.pop(),), dt))
            out += _block(part.module.block, part.name, here, dt, seen, steps)
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


@functools.lru_cache(maxsize=64)
def _abstract(model_cfg: ModelConfig, in_channels: int, optimizer: str):
    """(abstract model, parameter bytes, optimizer state bytes, other state bytes), built once
    per model (the planner estimates the same model on many meshes and ``gather_below``s;
    ``estimate`` passes gather_below = 0: it changes the plan, not the modules)."""
    model = nnx.eval_shape(lambda: unet.build(model_cfg, in_channels))
    params = nnx.state(model, nnx.Param)
    opt_state = jax.eval_shape(make_optimizer(TrainConfig(optimizer=optimizer)).init, params)
    return (model, _tree_bytes(params), _tree_bytes(opt_state),
            _tree_bytes(nnx.state(model, nnx.Not(nnx.Param))))


def estimate(model_cfg: ModelConfig, input_shape, mesh=(1, 1, 1), policy=None,
             optimizer: str = "adafactor", batch: int | None = None, in_channels: int = 1,
             backend: str = "halo", platform: str | None = None) -> dict:
    """Analytic bytes per device of one training step (see the module docstring).

    ``input_shape``: spatial ``(X, Y, Z)`` (with ``batch``) or ``(B, X, Y, Z, C)``; ``mesh``: a
    Mesh, ``(sx, sy, sz)`` or ``(data, sx, sy, sz)``; ``policy``: name or Policy (default: the
    config's). With ``backend="none"`` everything is on one device whatever the mesh.
    ``platform``: the compiler counted for, "cpu" | "gpu" | "tpu" (default: this process's JAX
    backend) — only XLA:CPU widens 16-bit convs to float32 (:func:`grad_bytes`).
    """
    platform = platform_of(platform)
    pol = precision.policy(policy or model_cfg.precision)
    model_cfg = with_precision(model_cfg, pol.name)
    shape = batch_shape(model_cfg, input_shape, batch, in_channels)
    ms = partition.devices_used(mesh_shape(mesh), backend)
    lead = local_shape(shape, ms, model_cfg.dims, unet.poolings_of(model_cfg))
    model, p, opt_bytes, state_bytes = _abstract(
        dataclasses.replace(model_cfg, gather_below=0), shape[-1], optimizer)
    dt = pol.compute_bytes
    plan, grown = gathered(model_cfg, lead, ms, backend)
    steps = []
    acts = tensors(model, lead + (shape[-1],), dt, grown, steps)
    peak = backward_peak(acts, steps, grad_bytes(platform, dt), 2 if math.prod(ms) > 1 else 1)
    out = {
        "platform": platform, "mesh": ms, "local_shape": lead + (shape[-1],), "policy": pol.name,
        "gathered": plan,  # mesh axes per level (model.gather_below)
        "params": unet.param_count(model), "param_bytes": p,
        "optimizer_bytes": opt_bytes, "state_bytes": state_bytes,
        "input_bytes": math.prod(lead) * (shape[-1] * 4 + 4),  # float32 image + int32 labels
        "activation_bytes": sum(t.bytes for t in acts),   # what autodiff saves
        "recomputed_bytes": sum(t.bytes for t in recomputed(acts)),
        "kept_bytes": peak["kept"],             # saved and still alive at the peak
        "workspace_bytes": peak["workspace"],   # the peak unit's gradients
        "peak_unit": peak["unit"],
        "backward_bytes": peak["bytes"],
        "gradient_bytes": p,
        # after the backward: the gradients, and on a mesh the all-reduce's output beside them
        "update_bytes": p * (2 if math.prod(ms) > 1 else 1),
        "layers": [t.__dict__ | {"bytes": t.bytes} for t in acts],
    }
    out["total"] = (p + out["optimizer_bytes"] + out["state_bytes"] + out["input_bytes"]
                    + max(out["backward_bytes"], out["update_bytes"]))
    return out


def with_precision(cfg: ModelConfig, name: str) -> ModelConfig:
    """The model as memory figures count it: in precision ``name``, built with XLA's own conv
    (``model.conv: xla``), what an accelerator runs — not the CPU's wide-image formulation."""
    return dataclasses.replace(cfg, precision=name, conv="xla")
