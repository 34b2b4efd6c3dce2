"""Per-device memory of a training step: analytic estimate, compiled measurement.

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
buffers of the largest conv's backward). ``measure`` compiles the real step
(step.make_train_step) on ShapeDtypeStructs: nothing is allocated, so a 512³ step on 512 fake
CPU devices compiles on a laptop.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hrseg.config import ModelConfig
from hrseg.nn import precision, unet
from hrseg.parallel import halo, partition
from hrseg.train import step

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


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text) -> int:
    """``"16GiB"``, ``"24 GB"``, ``"800MiB"``, ``"1e9"`` -> bytes."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        return int(float(num) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"cannot read '{text}' as a size: use e.g. 16GiB, 24GB, 800MiB") from None


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


def _batch_shape(model_cfg, input_shape, batch, in_channels):
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == model_cfg.dims:
        return (batch or 1,) + shape + (in_channels,)
    if len(shape) == model_cfg.dims + 2:
        return shape
    raise ValueError(f"input_shape {shape}: give the {model_cfg.dims} spatial sizes or "
                     f"(B, *spatial, C)")


def _local(shape, ms, ndim, poolings):
    data, *sp = ms
    B, *S, _ = shape
    if B % data:
        raise ValueError(f"batch {B} is not divisible by {data} data-parallel replicas")
    for s, n in zip(S, sp[:ndim]):
        if s % (n * 2 ** poolings):
            raise ValueError(f"spatial size {s} is not divisible by {n} devices × 2^{poolings} "
                             f"poolings (shape {tuple(S)}, mesh {ms})")
    return (B // data,) + tuple(s // n for s, n in zip(S, sp[:ndim]))


# --- the tensors of one training step --------------------------------------------------------

def _norm_act(name, na, dt, out):
    """Saved tensors of a NormAct whose output has shape ``out``."""
    if na.norm == "inplace_abn":
        return [Tensor(name, out, dt)]
    extra = [Tensor(name + ".mask", out, MASK_BYTES)]
    if na.norm != "none":
        extra.append(Tensor(name + ".input", out, dt))  # normalize keeps its input
    return extra + [Tensor(name, out, dt)]


def _unit(unit, name, lead, dt):
    """Saved tensors of one layers.Unit whose input has leading dims ``lead = (B, *S)``."""
    out = []
    if unit.depthwise is not None:  # the pointwise conv keeps the depthwise output
        out.append(Tensor(f"{name}.depthwise", lead + (unit.depthwise.kernel.shape[-1],), dt))
    return out + _norm_act(name, unit.act, dt, lead + (unit.conv.kernel.shape[-1],))


def _block(block, name, lead, dt):
    return [t for i, u in enumerate(block.units) for t in _unit(u, f"{name}.{i}", lead, dt)]


def tensors(model, model_cfg: ModelConfig, local_batch_shape, dt) -> list[Tensor]:
    """The activations one device keeps for the backward pass, in data-flow order."""
    B, *S, cin = local_batch_shape
    lead = (B,) + tuple(S)
    # the image is an argument (input_bytes); a cast to a narrower compute dtype is a new buffer
    out = [Tensor("input", lead + (cin,), dt)] if dt != 4 else []
    skips = []
    for i in range(model_cfg.levels - 1):
        out += _block(getattr(model, f"down_{i + 1}"), f"down_{i + 1}", lead, dt)
        skips.append((lead, out[-1].shape[-1]))
        lead = (B,) + tuple(s // 2 for s in lead[1:])
        out.append(Tensor(f"down_{i + 1}.pool", lead + (skips[-1][1],), dt))
    out += _block(model.bottom, "bottom", lead, dt)
    for i in reversed(range(model_cfg.levels - 1)):
        lead, c = skips[i]
        out.append(Tensor(f"up_{i + 1}.concat", lead + (2 * c,), dt))
        out += _block(getattr(model, f"up_{i + 1}").block, f"up_{i + 1}", lead, dt)
    k = model_cfg.classes
    out += [Tensor("logits", lead + (k,), 4), Tensor("log_probs", lead + (k,), 4),
            Tensor("logits.max", lead + (1,), 4)]  # log_softmax keeps its shift
    if dt != 4:  # every conv keeps its kernel cast to the compute dtype
        kernels = [x for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
                   if p[-1] == "kernel"]
        out.append(Tensor("kernels.cast", (sum(math.prod(x.shape) for x in kernels),), dt))
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


def _tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def make_optimizer(name: str) -> optax.GradientTransformation:
    if name == "adafactor":
        return optax.adafactor(1e-3)
    if name == "adam":
        return optax.adam(1e-3)
    raise ValueError(f"optimizer '{name}' is not 'adafactor' or 'adam'")


def estimate(model_cfg: ModelConfig, input_shape, mesh=(1, 1, 1), policy=None,
             optimizer: str = "adafactor", batch: int | None = None, in_channels: int = 1,
             backend: str = "halo") -> dict:
    """Analytic bytes per device of one training step (see the module docstring).

    ``input_shape``: spatial ``(X, Y, Z)`` (with ``batch``) or ``(B, X, Y, Z, C)``; ``mesh``: a
    Mesh, ``(sx, sy, sz)`` or ``(data, sx, sy, sz)``; ``policy``: name or Policy (default: the
    config's). With ``backend="none"`` everything is on one device whatever the mesh.
    """
    pol = precision.policy(policy or model_cfg.precision)
    model_cfg = _with_precision(model_cfg, pol.name)
    shape = _batch_shape(model_cfg, input_shape, batch, in_channels)
    ms = partition.devices_used(mesh_shape(mesh), backend)
    lead = _local(shape, ms, model_cfg.dims, unet.levels_of(model_cfg))
    model = nnx.eval_shape(lambda: unet.build(model_cfg, shape[-1]))
    params = nnx.state(model, nnx.Param)
    opt_state = jax.eval_shape(make_optimizer(optimizer).init, params)
    dt = pol.compute_bytes
    acts = tensors(model, model_cfg, lead + (shape[-1],), dt)
    saved = sum(t.bytes for t in acts)
    largest = max(t.bytes for t in _feature_maps(acts))
    split = partition.backend(backend).shard_map and math.prod(ms[1:]) > 1
    halo_bytes = _halo_staging(acts) if split else 0
    p = _tree_bytes(params)
    out = {
        "mesh": ms, "local_shape": lead + (shape[-1],), "policy": pol.name,
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


def _with_precision(cfg: ModelConfig, name: str) -> ModelConfig:
    import dataclasses
    return cfg if cfg.precision == name else dataclasses.replace(cfg, precision=name)


# --- compiled measurement --------------------------------------------------------------------

def cross_entropy(logits, labels):
    """Mean cross-entropy over every voxel of every shard (the loss of the measured step)."""
    logp = jax.nn.log_softmax(logits)
    picked = jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype), -1)
    return -halo.psum(jnp.sum(picked)) / halo.psum(jnp.float32(labels.size))


def abstract_step(model_cfg: ModelConfig, batch_shape, layout: partition.Layout,
                  optimizer: str = "adafactor", loss_fn=None, model_fn=None):
    """(jitted train_step, abstract args) for ``.lower(*args)``, without allocating."""
    pol = precision.policy(model_cfg.precision)
    build = model_fn or (lambda: unet.build(model_cfg, batch_shape[-1]))
    opt = make_optimizer(optimizer)
    graphdef = nnx.split(nnx.eval_shape(build), nnx.Param, ...)[0]
    state = jax.eval_shape(lambda: step.init_state(build(), opt, pol.loss_scaling)[1])
    fn = step.make_train_step(graphdef, opt, loss_fn or cross_entropy, layout,
                              ndim=model_cfg.dims, loss_scaling=pol.loss_scaling)
    return fn, step.abstract_inputs(state, layout, batch_shape, ndim=model_cfg.dims)


def make_mesh(mesh):
    """A partition.make_mesh mesh from :func:`mesh_shape`'s forms (first devices of the host)."""
    if hasattr(mesh, "devices"):
        return mesh
    data, *spatial = mesh_shape(mesh)
    n = data * math.prod(spatial)
    return partition.make_mesh(spatial, data, devices=jax.devices()[:n])


def measure(model_cfg: ModelConfig, input_shape, mesh=(1, 1, 1), policy=None,
            optimizer: str = "adafactor", batch: int | None = None, in_channels: int = 1,
            backend: str = "halo", model_fn=None, hlo: bool = False, loss_fn=None) -> dict:
    """Compile the real training step on ShapeDtypeStructs; per-device bytes from XLA.

    ``total = argument + output − alias + temp`` (the state is donated, so outputs alias).
    ``loss_fn(logits, labels)``: default :func:`cross_entropy`; a run's loss is
    ``losses.get(name, weights)``.
    """
    pol = precision.policy(policy or model_cfg.precision)
    model_cfg = _with_precision(model_cfg, pol.name)
    shape = _batch_shape(model_cfg, input_shape, batch, in_channels)
    if not hasattr(mesh, "devices"):  # a shape: only the devices the backend uses
        mesh = partition.devices_used(mesh_shape(mesh), backend)
    lay = partition.layout(make_mesh(mesh), backend)
    fn, args = abstract_step(model_cfg, shape, lay, optimizer, loss_fn=loss_fn,
                             model_fn=model_fn)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    ma = compiled.memory_analysis()
    out = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes),
           "compile_s": round(time.perf_counter() - t0, 2), "mesh": mesh_shape(lay.mesh),
           "backend": backend, "policy": pol.name}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    if hlo:
        out["hlo"] = compiled.as_text()
    return out


def residuals(model_cfg: ModelConfig, input_shape, policy=None, batch: int | None = None,
              in_channels: int = 1, loss_fn=None, model_fn=None) -> dict:
    """What autodiff keeps from the forward pass for the backward pass of one device's loss.

    Counted from the jaxpr of ``jax.vjp`` (nothing is compiled or allocated): every residual
    that is not an argument (parameters, image), each buffer once. This is what the model code
    decides, on any backend; the compiled figure adds what the compiler's schedule keeps alive
    beside it (see benchmarks/memory.py, PM4). Returns bytes and the number of residuals.
    """
    pol = precision.policy(policy or model_cfg.precision)
    model_cfg = _with_precision(model_cfg, pol.name)
    shape = _batch_shape(model_cfg, input_shape, batch, in_channels)
    build = model_fn or (lambda: unet.build(model_cfg, shape[-1]))
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    loss_fn = loss_fn or cross_entropy
    images = jax.ShapeDtypeStruct(shape, jnp.float32)                  # (B, *S, C)
    labels = jax.ShapeDtypeStruct(shape[:-1], jnp.int32)                # (B, *S)

    def loss(params, rest, images, labels):
        return loss_fn(step._merge(graphdef, params, rest)(images, train=True), labels)

    closed = jax.make_jaxpr(lambda p, r, x, y: jax.vjp(lambda p: loss(p, r, x, y), p)[1])(
        params, rest, images, labels)
    jaxpr = closed.jaxpr
    inputs = {id(v) for v in jaxpr.invars}
    seen, total = set(), 0
    for v in jaxpr.outvars:  # scalars (literals, step counts) are left out
        if not hasattr(v, "aval") or id(v) in inputs or id(v) in seen or not v.aval.shape:
            continue
        seen.add(id(v))
        total += math.prod(v.aval.shape) * jnp.dtype(v.aval.dtype).itemsize
    return {"bytes": total, "count": len(seen), "policy": pol.name}


def peak_bytes_on_device(model_cfg: ModelConfig, input_shape, batch: int = 1,
                         in_channels: int = 1, optimizer: str = "adafactor") -> int:
    """Allocator peak of one real step on the first accelerator (run once per process, with
    ``XLA_PYTHON_CLIENT_PREALLOCATE=false``; CPU devices report no memory stats)."""
    import numpy as np
    shape = _batch_shape(model_cfg, input_shape, batch, in_channels)
    lay = partition.layout(make_mesh((1, 1, 1)), "none")
    pol = precision.policy(model_cfg.precision)
    opt = make_optimizer(optimizer)
    graphdef, state = step.init_state(unet.build(model_cfg, shape[-1]), opt, pol.loss_scaling)
    fn = step.make_train_step(graphdef, opt, cross_entropy, lay, ndim=model_cfg.dims,
                              loss_scaling=pol.loss_scaling)
    x = np.zeros(shape, np.float32)
    y = np.zeros(shape[:-1], np.int32)
    state, metrics = fn(step.replicate(lay, state), *step.place_batch(lay, x, y, model_cfg.dims))
    jax.block_until_ready(metrics["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", -1))


