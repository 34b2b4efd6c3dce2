"""Compiled per-device memory of a training step, and what autodiff keeps.

``measure`` compiles the real step (step.make_train_step) on ShapeDtypeStructs: nothing is
allocated, so a 512³ step on 512 fake CPU devices compiles on a laptop. ``residuals`` counts
the buffers ``jax.vjp`` keeps for the backward pass, from its jaxpr.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from hrseg.config import Config, ModelConfig, TrainConfig
from hrseg.memory.analytic import batch_shape, mesh_shape, with_precision
from hrseg.nn import losses, precision, unet
from hrseg.parallel import partition
from hrseg.train import step
from hrseg.train.optim import make_optimizer


def abstract_step(model_cfg: ModelConfig, batch_shape, layout: partition.Layout,
                  optimizer: str | TrainConfig = "adafactor", loss_fn=None, model_fn=None):
    """(jitted train_step, abstract args) for ``.lower(*args)``, without allocating.
    ``optimizer``: a name, or a run's whole ``train`` section (its schedule too)."""
    pol = precision.policy(model_cfg.precision)
    build = model_fn or (lambda: unet.build(model_cfg, batch_shape[-1]))
    opt = make_optimizer(optimizer if isinstance(optimizer, TrainConfig)
                         else TrainConfig(optimizer=optimizer))
    graphdef = nnx.split(nnx.eval_shape(build), nnx.Param, ...)[0]
    state = jax.eval_shape(lambda: step.init_state(build(), opt, pol.loss_scaling)[1])
    fn = step.make_train_step(graphdef, opt, loss_fn or losses.cross_entropy, layout,
                              ndim=model_cfg.dims, loss_scaling=pol.loss_scaling)
    return fn, step.abstract_inputs(state, layout, batch_shape, ndim=model_cfg.dims)


def run_step(cfg: Config, input_shape=None):
    """``(jitted train step, abstract args)`` of a run config as ``hrseg train`` builds it —
    its model, precision, conv kernel, loss, optimizer and schedule, batch and mesh (on the
    process's first devices) — on ShapeDtypeStructs: ``fn.lower(*args)`` traces the real step
    and ``.compile()`` compiles it, nothing allocated. ``input_shape``: the spatial sizes
    (default: ``data.patch`` or ``data.resolution``; give one for ``resample: native``)."""
    m, t = cfg.mesh, cfg.train
    n = m.data * math.prod(m.spatial)
    if n > jax.device_count():
        raise ValueError(f"the {m.data}×{'×'.join(map(str, m.spatial))} mesh needs {n} devices; "
                         f"this process has {jax.device_count()}")
    lay = partition.layout(partition.make_mesh(m.spatial, m.data, devices=jax.devices()[:n]),
                           m.backend)
    shape = batch_shape(cfg.model, tuple(input_shape or cfg.data.patch or cfg.data.resolution),
                        t.batch, cfg.in_channels)
    return abstract_step(cfg.model, shape, lay, t,
                         loss_fn=losses.get(t.loss, t.ce_weights, t.dice_weight))


def measure(model_cfg: ModelConfig, input_shape, mesh=(1, 1, 1), policy=None,
            optimizer: str = "adafactor", batch: int | None = None, in_channels: int = 1,
            backend: str = "halo", model_fn=None, hlo: bool = False, loss_fn=None) -> dict:
    """Compile the real training step on ShapeDtypeStructs; per-device bytes from XLA.

    ``total = argument + output − alias + temp`` (the state is donated, so outputs alias).
    ``loss_fn(logits, labels)``: default ``losses.cross_entropy``; a run's loss is
    ``losses.get(name, weights)``.
    """
    pol = precision.policy(policy or model_cfg.precision)
    model_cfg = with_precision(model_cfg, pol.name)
    shape = batch_shape(model_cfg, input_shape, batch, in_channels)
    if not hasattr(mesh, "devices"):  # a shape: the host's first devices the backend uses
        data, *spatial = partition.devices_used(mesh_shape(mesh), backend)
        n = data * math.prod(spatial)
        mesh = partition.make_mesh(spatial, data, devices=jax.devices()[:n])
    lay = partition.layout(mesh, backend)
    fn, args = abstract_step(model_cfg, shape, lay, optimizer, loss_fn=loss_fn,
                             model_fn=model_fn)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()    # with_precision: XLA's conv, as on a GPU/TPU
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
    model_cfg = with_precision(model_cfg, pol.name)
    shape = batch_shape(model_cfg, input_shape, batch, in_channels)
    build = model_fn or (lambda: unet.build(model_cfg, shape[-1]))
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    loss_fn = loss_fn or losses.cross_entropy
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
