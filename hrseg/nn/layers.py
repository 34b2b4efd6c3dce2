"""Flax NNX layers built on halo.py — the same code runs on every backend.

Every spatial op goes through halo.conv / conv_transpose / max_pool / moments: inside
``jax.shard_map`` they exchange margins and psum statistics, on a global array (gspmd, one
device) they are the plain ops. Parameters are float32; inputs and kernels are cast to the
policy's compute dtype; normalization runs in float32 and hands back the compute dtype.

A block is ``convs`` units (conv -> norm-act) at one resolution; Wang et al.'s ablation
changes what a block is made of (m = C/K channels inside a bottleneck):

  plain       [3³ conv] × convs
  separable   [depthwise 3³ + pointwise 1³] × convs      (the network's first conv stays 3³:
                                                           a depthwise conv of one channel is
                                                           a single filter)
  bottleneck  1³ reduce C -> m, [3³ conv m -> m] × n, 1³ restore m -> C
  compact     1³ reduce C -> m, [depthwise 3³ + pointwise 1³] × n, 1³ restore m -> C
              (the Compact ConvBlock: bottleneck + depthwise-separable)
              n = ``bottleneck_convs`` (1: ResNet's 1-3-1, Wang's text), 0 = ``convs``

Between levels (unet.py): 2× max-pool or a 3³ stride-2 conv unit (``downsample``), and a k2s2
transposed conv or a ResizeConv (``upsample``); the block type never changes these.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hrseg.nn.norm import (
    INVERTIBLE,
    effective_scale,
    forward_act,
    inplace_abn,
    normalize,
)
from hrseg.parallel import halo, partition

ACTIVATIONS = ("leaky_relu", "relu", "elu", "identity")
NORMS = ("batch", "group", "instance", "inplace_abn", "none")
BLOCKS = ("plain", "bottleneck", "separable", "compact")
SLOPE = 0.1  # leaky ReLU slope of the released Mesh-TF code


def _he(key, shape):
    """He-normal kernel (the activations are (leaky) ReLUs), fan-in = all but the last dim.

    Drawn with NumPy from the key's bits: jax.random would compile one program per kernel
    shape, which dominates building a small network on CPU. Under a trace (eval_shape, jit)
    it stays symbolic.
    """
    std = np.sqrt(2.0 / max(int(np.prod(shape[:-1])), 1))
    if isinstance(key, jax.core.Tracer):
        return std * jax.random.normal(key, shape)
    seed = np.asarray(jax.random.key_data(key)).ravel()
    rng = np.random.default_rng(seed)
    return jnp.asarray((std * rng.standard_normal(shape)).astype(np.float32))


def _const(value: float, n: int):
    return jnp.asarray(np.full((n,), value, np.float32))


def activate(x, name: str):
    if name == "relu":
        return jax.nn.relu(x)
    if name in INVERTIBLE:
        return forward_act(x, name, SLOPE)
    raise ValueError(f"activation '{name}' is not one of {ACTIVATIONS}")


class Conv(nnx.Module):
    """SAME conv with an odd kernel (halo-exchanged when sharded); ``groups=cin`` = depthwise;
    ``stride=2`` halves every spatial size (a learned down-sampling)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, ndim: int = 3, groups: int = 1,
                 bias: bool = False, stride: int = 1, dtype=jnp.float32, impl: str = "auto",
                 rngs: nnx.Rngs):
        if cin % groups or cout % groups:
            raise ValueError(f"Conv: {cin} -> {cout} channels not divisible into {groups} groups")
        self.groups, self.stride, self.dtype = groups, stride, dtype
        self.impl = impl                # halo.conv's kernel (parallel/cpuconv.KERNELS)
        self.kernel = nnx.Param(_he(rngs.params(), (kernel,) * ndim + (cin // groups, cout)))
        self.bias = nnx.Param(_const(0.0, cout)) if bias else None

    def __call__(self, x):
        y = halo.conv(x.astype(self.dtype), self.kernel[...], strides=self.stride,
                      feature_group_count=self.groups, impl=self.impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class ConvTranspose(nnx.Module):
    """Kernel-2 stride-2 up-sampling (local to each shard; no bias, as in Mesh-TF)."""

    def __init__(self, cin: int, cout: int, *, ndim: int = 3, dtype=jnp.float32,
                 impl: str = "auto", rngs: nnx.Rngs):
        self.dtype = dtype
        self.impl = impl                # halo.conv_transpose's formulation (cpuconv.KERNELS)
        self.kernel = nnx.Param(_he(rngs.params(), (2,) * ndim + (cin, cout)))

    def __call__(self, x):
        return halo.conv_transpose(x.astype(self.dtype), self.kernel[...], impl=self.impl)


class NormAct(nnx.Module):
    """Normalization followed by the activation, fused for ``inplace_abn``.

    batch / inplace_abn: statistics over batch and space of the *global* tensor (psum over
    "data", "x", "y", "z"), running averages in BatchStat for eval; group / instance: per
    sample over space and channel groups (psum over the spatial mesh axes only).
    """

    def __init__(self, features: int, norm: str = "batch", activation: str = "leaky_relu", *,
                 groups: int = 8, momentum: float = 0.9, eps: float = 1e-6,
                 dtype=jnp.float32):
        if norm not in NORMS:
            raise ValueError(f"norm '{norm}' is not one of {NORMS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation '{activation}' is not one of {ACTIVATIONS}")
        if norm == "inplace_abn" and activation not in INVERTIBLE:
            raise ValueError(f"norm 'inplace_abn' inverts the activation: use one of "
                             f"{INVERTIBLE}, not '{activation}'")
        self.norm, self.activation, self.dtype = norm, activation, dtype
        self.momentum, self.eps = momentum, eps
        self.groups = features if norm == "instance" else min(groups, features)
        if norm == "group" and features % self.groups:
            raise ValueError(f"group norm: {features} channels not divisible by {groups} groups")
        if norm != "none":
            self.scale = nnx.Param(_const(1.0, features))
            self.bias = nnx.Param(_const(0.0, features))
        if norm in ("batch", "inplace_abn"):
            self.mean = nnx.BatchStat(_const(0.0, features))
            self.var = nnx.BatchStat(_const(1.0, features))

    def _update(self, mean, var):
        m = self.momentum  # set_value: ``v[...] = `` asks a tracer for its sharding (slow)
        self.mean.set_value(m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean))
        self.var.set_value(m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var))

    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        if self.norm == "none":
            return activate(x, self.activation)
        scale, bias = self.scale[...], self.bias[...]
        if self.norm == "inplace_abn":
            if train:
                y, mean, var = inplace_abn(x, scale, bias, self.eps, self.activation,
                                                SLOPE, partition.AXES)
                self._update(mean, var)
                return y
            scale = effective_scale(scale)
        if self.norm in ("batch", "inplace_abn"):
            if train:
                z, mean, var = normalize(x, scale, bias, tuple(range(x.ndim - 1)),
                                              partition.AXES, self.eps)
                self._update(mean.reshape(-1), var.reshape(-1))
            else:  # running statistics: a per-channel affine map in the compute dtype
                a = scale * jax.lax.rsqrt(self.var[...] + self.eps)
                z = x * a.astype(x.dtype) + (bias - self.mean[...] * a).astype(x.dtype)
        else:  # group / instance: per sample, over space and the channels of a group
            B, *S, C = x.shape
            shape = (self.groups, C // self.groups)
            g = x.reshape(B, *S, *shape)
            z, _, _ = normalize(g, scale.reshape(shape), bias.reshape(shape),
                                     tuple(range(1, len(S) + 1)) + (g.ndim - 1,),
                                     partition.SPATIAL, self.eps)
            z = z.reshape(x.shape)
        return activate(z, self.activation)


@dataclass(frozen=True)
class Opts:
    """What every unit of a network shares (built once from the ModelConfig)."""
    ndim: int = 3                       # spatial dims: 3 (UNet3D) or 2 (UNet2D)
    block: str = "plain"                # one of BLOCKS
    reduction: int = 4                  # K of the bottleneck: C -> C/K inside a unit
    bottleneck_convs: int = 0           # 3³ convs between a bottleneck's 1³ convs (0: convs)
    norm: str = "batch"                 # one of NORMS
    activation: str = "leaky_relu"      # one of ACTIVATIONS
    norm_groups: int = 8                # groups of group norm
    momentum: float = 0.9               # running-statistics decay (Mesh-TF: 0.9)
    eps: float = 1e-6                   # variance epsilon (Mesh-TF: 1e-6)
    dtype: jnp.dtype = jnp.float32      # compute dtype of the precision policy
    kernel: str = "auto"                # 3D conv kernel (parallel/cpuconv.KERNELS)

    def norm_act(self, features: int) -> NormAct:
        return NormAct(features, self.norm, self.activation, groups=self.norm_groups,
                       momentum=self.momentum, eps=self.eps, dtype=self.dtype)

    def conv(self, cin, cout, kernel, rngs, groups=1, stride=1) -> Conv:
        bias = self.norm == "none" and groups == 1  # a conv followed by a norm needs no bias
        return Conv(cin, cout, kernel, ndim=self.ndim, groups=groups, bias=bias,
                    stride=stride, dtype=self.dtype, impl=self.kernel, rngs=rngs)


class Unit(nnx.Module):
    """One conv ``cin -> cout`` followed by NormAct. ``kind``: "full" (3³), "separable"
    (depthwise 3³ + pointwise 1³, one NormAct after both) or "pointwise" (1³); ``stride=2``
    (full only): a 3³ stride-2 conv, the learned down-sampling of ``model.downsample: conv``."""

    def __init__(self, cin: int, cout: int, opts: Opts, *, kind: str = "full",
                 stride: int = 1, rngs: nnx.Rngs):
        if kind not in ("full", "separable", "pointwise"):
            raise ValueError(f"unit kind '{kind}' is not full, separable or pointwise")
        if stride != 1 and kind != "full":
            raise ValueError(f"unit kind '{kind}': only a full 3³ conv takes a stride")
        self.depthwise = opts.conv(cin, cin, 3, rngs, groups=cin) if kind == "separable" else None
        self.conv = opts.conv(cin, cout, 3 if kind == "full" else 1, rngs, stride=stride)
        self.act = opts.norm_act(cout)

    def __call__(self, x, train: bool):
        if self.depthwise is not None:
            x = self.depthwise(x)
        return self.act(self.conv(x), train)


class ConvBlock(nnx.Module):
    """The units of one resolution level, ``cin -> cout``, as ``opts.block`` lays them out.

    ``first``: this block takes the network's input (a separable first conv would be a single
    3³ filter of the CT channel, so it stays a full conv).
    """

    def __init__(self, cin: int, cout: int, convs: int, opts: Opts, *, rngs: nnx.Rngs,
                 first: bool = False):
        if opts.block not in BLOCKS:
            raise ValueError(f"block '{opts.block}' is not one of {BLOCKS}")
        sep = opts.block in ("separable", "compact")
        kind = "separable" if sep else "full"
        if opts.block in ("bottleneck", "compact"):
            m = max(cout // opts.reduction, 1)
            inner = opts.bottleneck_convs or convs
            plan = ([(cin, m, "pointwise")] + [(m, m, kind)] * inner
                    + [(m, cout, "pointwise")])
        else:
            plan = [(cin if i == 0 else cout, cout,
                     "full" if (first and i == 0) else kind) for i in range(convs)]
        self.units = nnx.List([Unit(a, b, opts, kind=k, rngs=rngs) for a, b, k in plan])

    def __call__(self, x, train: bool):
        for unit in self.units:
            x = unit(x, train)
        return x


def CompactConvBlock(cin: int, cout: int, convs: int, opts: Opts, **kw) -> ConvBlock:
    """Wang et al.'s Compact ConvBlock: 1³ reduce by K -> [depthwise 3³ + pointwise 1³] ×
    convs -> 1³ restore, each conv followed by NormAct."""
    return ConvBlock(cin, cout, convs, replace(opts, block="compact"), **kw)


def repeat2(x):
    """``(B, *S, C) -> (B, *2S, C)``: every voxel repeated 2× along each spatial axis (nearest
    up-sampling; local to a shard, as the k2s2 transposed conv is)."""
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x


class ResizeConv(nnx.Module):
    """Nearest 2× up-sampling, then a full 3³ conv ``cin -> cout`` and NormAct (Isensee et al.'s
    up-sampling module); ``model.upsample: resize_conv``."""

    def __init__(self, cin: int, cout: int, opts: Opts, *, rngs: nnx.Rngs):
        self.unit = Unit(cin, cout, opts, kind="full", rngs=rngs)

    def __call__(self, x, train: bool):
        return self.unit(repeat2(x), train)


UPSAMPLES = ("transpose", "resize_conv")
DOWNSAMPLES = ("maxpool", "conv")


class UpBlock(nnx.Module):
    """Up-sampling ``cin -> cout`` (k2s2 transposed conv, or ResizeConv), concatenate the skip,
    then a ConvBlock."""

    def __init__(self, cin: int, cout: int, convs: int, opts: Opts, *, rngs: nnx.Rngs,
                 upsample: str = "transpose"):
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample '{upsample}' is not one of {UPSAMPLES}")
        self.upsample = (ConvTranspose(cin, cout, ndim=opts.ndim, dtype=opts.dtype,
                                       impl=opts.kernel, rngs=rngs)
                         if upsample == "transpose" else ResizeConv(cin, cout, opts, rngs=rngs))
        self.block = ConvBlock(2 * cout, cout, convs, opts, rngs=rngs)

    def __call__(self, x, skip, train: bool):
        x = (self.upsample(x) if isinstance(self.upsample, ConvTranspose)
             else self.upsample(x, train))
        return self.block(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), train)
