"""UNet3D / UNet2D (Flax NNX); the papers' presets are config.preset (re-exported here).

Parts are named in data-flow order — ``down_1 … down_{L-1}`` (each followed by ``pool_i``
with ``downsample: conv``), ``bottom``, ``up_{L-1} … up_1``, ``head`` — and listed by
``UNet.parts()``, which the forward pass and hrseg.memory's estimate both walk (so a part
cannot be in one and not the other); each is built from layers.py, so one model runs on the
halo, gspmd and none backends. ``model(x, train) -> logits``: x ``(B, X, Y, Z, Cin)`` (2D
``(B, X, Y, Cin)``), logits float32 ``(B, X, Y, Z, classes)``. Every spatial size must be a multiple of
``2 ** poolings_of(cfg)`` (partition.check_divisible); one that does not split evenly over
its devices is padded and masked by the partitioned step (parallel/uneven.py).

Coarse levels on fewer devices: with ``cfg.gather_below`` > 0, inside shard_map a level whose
per-device block on a mesh axis is below that many voxels runs all-gathered on that axis
(submesh.level_plan); its skip stays gathered, and the up-path takes the coarser level's
output back to this level's blocks before the k2s2 up-conv (which is local).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from hrseg.config import (  # noqa: F401  (re-exported: config.py owns the presets)
    PAPER_SCHEDULE,
    PRESETS,
    ModelConfig,
    preset,
)
from hrseg.nn import precision
from hrseg.nn.layers import DOWNSAMPLES, Conv, ConvBlock, Opts, Unit, UpBlock
from hrseg.parallel import halo, submesh


def poolings_of(cfg: ModelConfig) -> int:
    """Number of 2× poolings (for partition.check_divisible)."""
    return cfg.levels - 1


def filters(cfg: ModelConfig) -> list[int]:
    """Filters per resolution level, finest first."""
    return [cfg.base * 2 ** i for i in range(cfg.levels)]


def opts(cfg: ModelConfig) -> Opts:
    return Opts(ndim=cfg.dims, block=cfg.block, reduction=cfg.reduction,
                bottleneck_convs=cfg.bottleneck_convs, norm=cfg.norm,
                activation=cfg.activation, norm_groups=cfg.norm_groups,
                momentum=cfg.bn_momentum, eps=cfg.bn_eps,
                dtype=precision.policy(cfg.precision).compute_dtype, kernel=cfg.conv)


@dataclass(frozen=True)
class Part:
    """One step of the network's data flow (see :meth:`UNet.parts`)."""
    name: str
    module: nnx.Module
    level: int    # resolution level: the input's spatial sizes / 2**level
    role: str     # "down": block, its output is a skip, then a 2× max-pool (unless a "pool"
                  # part follows: a 3³ stride-2 conv unit, ``downsample: conv``); "bottom":
                  # block; "up": up-sampling, concatenate the skip, block; "head": 1³ conv


class UNet(nnx.Module):
    """Encoder blocks + max-pool, bottom block, k2s2 up + concat + block, 1³ head."""

    def __init__(self, cfg: ModelConfig, in_channels: int = 1, *, rngs: nnx.Rngs):
        if cfg.levels < 1:
            raise ValueError(f"levels must be >= 1, got {cfg.levels}")
        if cfg.downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample '{cfg.downsample}' is not one of {DOWNSAMPLES}")
        o = opts(cfg)
        f = filters(cfg)
        self.ndim, self.levels = cfg.dims, cfg.levels
        self.gather_below = cfg.gather_below
        self.conv_pool = cfg.downsample == "conv"
        c = in_channels
        for i in range(cfg.levels - 1):
            setattr(self, f"down_{i + 1}", ConvBlock(c, f[i], cfg.convs_per_block, o, rngs=rngs,
                                                     first=i == 0))
            c = f[i]
            if self.conv_pool:  # 3³ stride 2, doubling the channels (Isensee et al.)
                setattr(self, f"pool_{i + 1}", Unit(c, f[i + 1], o, stride=2, rngs=rngs))
                c = f[i + 1]
        self.bottom = ConvBlock(c, f[-1], cfg.convs_per_block, o, rngs=rngs,
                                first=cfg.levels == 1)
        for i in reversed(range(cfg.levels - 1)):
            setattr(self, f"up_{i + 1}", UpBlock(f[i + 1], f[i], cfg.convs_per_block, o,
                                                 rngs=rngs, upsample=cfg.upsample))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None
        self.head = Conv(f[0], cfg.classes, 1, ndim=cfg.dims, bias=cfg.head_bias,
                         dtype=o.dtype, impl=o.kernel, rngs=rngs)   # model.conv, as every conv

    @property
    def poolings(self) -> int:
        """2× poolings of the network (train/step.py pads uneven shards to fit them)."""
        return self.levels - 1

    def parts(self) -> list[Part]:
        """The network in data-flow order; ``__call__`` runs exactly this list."""
        down = []
        for i in range(self.levels - 1):
            down.append(Part(f"down_{i + 1}", getattr(self, f"down_{i + 1}"), i, "down"))
            if self.conv_pool:   # input at level i, output at level i + 1
                down.append(Part(f"pool_{i + 1}", getattr(self, f"pool_{i + 1}"), i, "pool"))
        up = [Part(f"up_{i + 1}", getattr(self, f"up_{i + 1}"), i, "up")
              for i in reversed(range(self.levels - 1))]
        return [*down, Part("bottom", self.bottom, self.levels - 1, "bottom"), *up,
                Part("head", self.head, 0, "head")]

    def __call__(self, x, train: bool = False):
        if x.ndim != self.ndim + 2:
            raise ValueError(f"UNet{self.ndim}D expects (B, {'X, Y, Z' if self.ndim == 3 else 'X, Y'}"
                             f", C), got shape {tuple(x.shape)}")
        skips = []
        plan = self.gather_plan(x.shape)
        held = ()  # the mesh axes x is gathered on
        for part in self.parts():
            x, held = _regather(x, held, plan[part.level])
            if part.role == "down":
                x = part.module(x, train)
                skips.append(x)
                if not self.conv_pool:
                    x = halo.max_pool(x)
            elif part.role in ("pool", "bottom"):
                x = part.module(x, train)
            elif part.role == "up":
                x = part.module(x, skips.pop(), train)
            else:
                if self.dropout is not None:
                    x = self.dropout(x, deterministic=not train)
                x = part.module(x)
        x, _ = _regather(x, held, ())
        return x.astype(jnp.float32)

    def gather_plan(self, shard_shape) -> list[tuple[str, ...]]:
        """The mesh axes each level runs all-gathered on (submesh.level_plan), for an input
        shard of ``shard_shape``; all empty outside shard_map or with gather_below = 0."""
        if not self.gather_below:
            return [()] * self.levels
        return submesh.level_plan(shard_shape, self.levels, self.gather_below)


def _regather(x, held, want):
    """``x`` gathered on the mesh axes ``held`` -> gathered on ``want`` (an "up" part's input
    is the coarser level's output: scattered before its up-conv, which is local)."""
    if set(held) == set(want):
        return x, held
    x = submesh.scatter(x, [a for a in held if a not in want])
    x = submesh.gather(x, [a for a in want if a not in held])
    return x, tuple(want)


class UNet3D(UNet):
    pass


class UNet2D(UNet):
    pass


def build(model_cfg: ModelConfig, in_channels: int = 1, rngs: nnx.Rngs | None = None) -> UNet:
    """The network of a ModelConfig (config.load / config.preset have applied its preset)."""
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if model_cfg.dims not in (2, 3):
        raise ValueError(f"model.dims must be 2 or 3, got {model_cfg.dims}")
    cls = UNet3D if model_cfg.dims == 3 else UNet2D
    return cls(model_cfg, in_channels, rngs=rngs)


def param_count(model_or_cfg, in_channels: int = 1) -> int:
    """Trainable parameters (nnx.Param leaves) of a model, or of a config without allocating."""
    if isinstance(model_or_cfg, ModelConfig):
        model = nnx.eval_shape(lambda: build(model_or_cfg, in_channels))
    else:
        model = model_or_cfg
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
