"""UNet3D / UNet2D (Flax NNX) and the presets of the two papers.

Parts are named in data-flow order — ``down_1 … down_{L-1}``, ``bottom``, ``up_{L-1} … up_1``,
``head`` — and listed by ``UNet.parts()``, which the forward pass and hrseg.memory's estimate
both walk (so a part cannot be in one and not the other); each is built from layers.py, so one model runs on the halo, gspmd and none
backends. ``model(x, train) -> logits``: x ``(B, X, Y, Z, Cin)`` (2D ``(B, X, Y, Cin)``),
logits float32 ``(B, X, Y, Z, classes)``. Every spatial size must be a multiple of
``2 ** levels_of(cfg)`` per shard (partition.check_divisible).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from hrseg.config import ModelConfig
from hrseg.nn import precision
from hrseg.nn.layers import Conv, ConvBlock, Opts, UpBlock
from hrseg.parallel import halo

PRESETS = ("tiny", "mtf", "paper", "paper2d", "wang_baseline", "wang_compact")

# Hou et al. (2019), Sec. 3: at 64³ three blocks of four 3³ convs starting at 256 filters and
# doubling after each pool (levels 256, 512, 1024); each doubling of the resolution puts one
# more block in front with half the filters, so every resolution ends at 1024 filters and a
# similar receptive field in millimetres.  resolution -> (levels, base filters)
PAPER_SCHEDULE = {64: (3, 256), 128: (4, 128), 256: (5, 64), 512: (6, 32)}


def preset(name: str, resolution: int | None = None) -> ModelConfig:
    """The ModelConfig of a named architecture (``resolution`` only for ``"paper"``).

    * ``tiny``   levels 2, base 4: the test variant of every other preset.
    * ``mtf``    tensorflow/mesh ``experimental/unet.py`` flag defaults: ``network_depth 4``
      levels, ``n_base_filters 32`` doubling, ``n_conv_per_block 2``, conv without bias ->
      ``batch_norm(momentum 0.90, epsilon 1e-6)`` -> ``leaky_relu(0.1)``, k2s2 transposed conv
      (``n_base_filters * 2**depth`` filters) then concat, 1×1×1 head without bias. (Its
      ``dropout_keep_p 0.5`` flag is left out: dropout defaults to off here.)
    * ``paper``  Hou et al. 3D schedule (PAPER_SCHEDULE), 4 convs per block, bfloat16 as in
      the released code's ``mtf_dtype`` flag.
    * ``paper2d`` the same architecture as paper(512) in 2D, for 512² slices with the
      adjacent slices as channels (``build(cfg, in_channels=5)``).
    * ``wang_baseline`` / ``wang_compact`` Wang, Oda & Mori (2020): a 3D U-Net baseline and
      the same network with Compact ConvBlocks (their Table 1 reports ~9.5 M and ~2.6 M
      parameters). Their layer widths are not published in what we could read; this is our
      reconstruction: the mtf network with 3 convs per block (8,533,059 parameters) and 4
      levels, so 256×256×152 pools evenly; compact = 1³ reduce by K = 4, three depthwise-
      separable convs, 1³ restore per block (430,235, i.e. 5 % of the baseline, inside the
      issue's ≤ 30 %; hand counts in tests/test_unet.py).
    """
    mtf = ModelConfig(preset="mtf", dims=3, levels=4, base=32, convs_per_block=2,
                      block="plain", norm="batch", bn_momentum=0.9, bn_eps=1e-6,
                      activation="leaky_relu", head_bias=False, classes=3, precision="fp32")
    if name == "mtf":
        return mtf
    if name == "tiny":
        return dataclasses.replace(mtf, preset="tiny", levels=2, base=4)
    if name in ("paper", "paper2d"):
        res = 512 if name == "paper2d" else resolution
        if res not in PAPER_SCHEDULE:
            raise ValueError(f"preset 'paper' needs resolution in {sorted(PAPER_SCHEDULE)}, "
                             f"got {resolution}")
        levels, base = PAPER_SCHEDULE[res]
        return dataclasses.replace(mtf, preset=name, dims=2 if name == "paper2d" else 3,
                                   levels=levels, base=base, convs_per_block=4,
                                   precision="bf16")
    if name == "wang_baseline":
        return dataclasses.replace(mtf, preset=name, convs_per_block=3, head_bias=True)
    if name == "wang_compact":
        return dataclasses.replace(preset("wang_baseline"), preset=name, block="compact",
                                   reduction=4)
    raise ValueError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")


def levels_of(cfg: ModelConfig) -> int:
    """Number of 2× poolings (for partition.check_divisible)."""
    return cfg.levels - 1


def filters(cfg: ModelConfig) -> list[int]:
    """Filters per resolution level, finest first."""
    return [cfg.base * 2 ** i for i in range(cfg.levels)]


def opts(cfg: ModelConfig) -> Opts:
    return Opts(ndim=cfg.dims, block=cfg.block, reduction=cfg.reduction, norm=cfg.norm,
                activation=cfg.activation, norm_groups=cfg.norm_groups,
                momentum=cfg.bn_momentum, eps=cfg.bn_eps,
                dtype=precision.policy(cfg.precision).compute_dtype)


@dataclass(frozen=True)
class Part:
    """One step of the network's data flow (see :meth:`UNet.parts`)."""
    name: str
    module: nnx.Module
    level: int    # resolution level: the input's spatial sizes / 2**level
    role: str     # "down": block, its output is a skip, then a 2× max-pool; "bottom": block;
                  # "up": k2s2 up-conv, concatenate the skip, block; "head": 1³ conv -> logits


class UNet(nnx.Module):
    """Encoder blocks + max-pool, bottom block, k2s2 up + concat + block, 1³ head."""

    def __init__(self, cfg: ModelConfig, in_channels: int = 1, *, rngs: nnx.Rngs):
        if cfg.levels < 1:
            raise ValueError(f"levels must be >= 1, got {cfg.levels}")
        o = opts(cfg)
        f = filters(cfg)
        self.ndim, self.levels = cfg.dims, cfg.levels
        c = in_channels
        for i in range(cfg.levels - 1):
            setattr(self, f"down_{i + 1}", ConvBlock(c, f[i], cfg.convs_per_block, o, rngs=rngs,
                                                     first=i == 0))
            c = f[i]
        self.bottom = ConvBlock(c, f[-1], cfg.convs_per_block, o, rngs=rngs,
                                first=cfg.levels == 1)
        for i in reversed(range(cfg.levels - 1)):
            setattr(self, f"up_{i + 1}", UpBlock(f[i + 1], f[i], cfg.convs_per_block, o,
                                                 rngs=rngs))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None
        self.head = Conv(f[0], cfg.classes, 1, ndim=cfg.dims, bias=cfg.head_bias,
                         dtype=o.dtype, rngs=rngs)

    def parts(self) -> list[Part]:
        """The network in data-flow order; ``__call__`` runs exactly this list."""
        down = [Part(f"down_{i + 1}", getattr(self, f"down_{i + 1}"), i, "down")
                for i in range(self.levels - 1)]
        up = [Part(f"up_{i + 1}", getattr(self, f"up_{i + 1}"), i, "up")
              for i in reversed(range(self.levels - 1))]
        return [*down, Part("bottom", self.bottom, self.levels - 1, "bottom"), *up,
                Part("head", self.head, 0, "head")]

    def __call__(self, x, train: bool = False):
        if x.ndim != self.ndim + 2:
            raise ValueError(f"UNet{self.ndim}D expects (B, {'X, Y, Z' if self.ndim == 3 else 'X, Y'}"
                             f", C), got shape {tuple(x.shape)}")
        skips = []
        for part in self.parts():
            if part.role == "down":
                x = part.module(x, train)
                skips.append(x)
                x = halo.max_pool(x)
            elif part.role == "bottom":
                x = part.module(x, train)
            elif part.role == "up":
                x = part.module(x, skips.pop(), train)
            else:
                if self.dropout is not None:
                    x = self.dropout(x, deterministic=not train)
                x = part.module(x)
        return x.astype(jnp.float32)


class UNet3D(UNet):
    pass


class UNet2D(UNet):
    pass


def build(model_cfg: ModelConfig, in_channels: int = 1, rngs: nnx.Rngs | None = None) -> UNet:
    """The network of a ModelConfig (``preset`` other than "custom" only documents it)."""
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
