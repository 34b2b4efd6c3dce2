"""Pick a partition and the memory techniques that fit a per-device memory budget.

nnU-Net shrinks the patch until it fits the GPU; here the whole volume is kept and the choice is
how to split it (data × x × y × z) and which of Wang et al.'s techniques to switch on. The
techniques are tried from the least to the most intrusive (bf16, in-place ABN, Compact
ConvBlocks); at the first step where some mesh fits, the mesh with the most headroom wins.
Per-device activations are about the same for every split of the same device count, so the
headroom favours data parallelism (no halos) as far as the batch allows, then cube-like
spatial splits (smallest halo surface).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hrseg.config import ModelConfig
from hrseg.memory import analytic
from hrseg.nn import unet

# (label, changes to the ModelConfig), cumulative, least intrusive first
LADDER = (
    ("as configured", {}),
    ("bf16 compute", {"precision": "bf16"}),
    ("+ in-place ABN", {"precision": "bf16", "norm": "inplace_abn"}),
    ("+ Compact ConvBlocks", {"precision": "bf16", "norm": "inplace_abn", "block": "compact"}),
)


def _fmt(b: float) -> str:
    return f"{b / analytic.GiB:.2f} GiB"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def spatial_splits(n: int, shape, levels: int, ndim: int = 3) -> list[tuple[int, int, int]]:
    """Splits ``(sx, sy, sz)`` of ``n`` devices whose shards pool evenly ``levels`` times, the
    most cube-like shards (smallest halo surface) first."""
    out = []
    for sx in _divisors(n):
        for sy in _divisors(n // sx):
            sz = n // (sx * sy)
            split = (sx, sy, sz)
            if ndim == 2 and sz != 1:
                continue
            if all(s % (k * 2 ** levels) == 0 for s, k in zip(shape, split)):
                local = [s // k for s, k in zip(shape, split)]
                surface = sum(math.prod(local) / d for d in local)
                out.append((surface, split))
    return [s for _, s in sorted(out)]


@dataclass
class Plan:
    budget: int                          # bytes per device
    n_devices: int
    shape: tuple[int, ...]               # spatial size of the volume
    batch: int
    mesh: tuple[int, int, int, int] | None   # (data, sx, sy, sz); None = nothing fits
    model: ModelConfig | None
    technique: str = ""
    estimate: dict = field(default_factory=dict)
    considered: list[tuple[str, str, int | None]] = field(default_factory=list)

    @property
    def headroom(self) -> int:
        return self.budget - self.estimate.get("total", self.budget) if self.mesh else -1

    def explain(self) -> str:
        shape = "×".join(map(str, self.shape))
        lines = [(f"Volume {shape}, batch {self.batch}, {self.n_devices} devices, "
                  f"budget {_fmt(self.budget)} per device.")]
        if self.mesh is None:
            best = min((t for _, _, t in self.considered if t), default=None)
            lines.append("Nothing fits" + (f": the smallest estimate is {_fmt(best)} per "
                                           f"device" if best else "") + ".")
        else:
            d, *sp = self.mesh
            e = self.estimate
            m = self.model
            state = e["param_bytes"] + e["gradient_bytes"] + e["optimizer_bytes"]
            lines.append(f"Plan: {d} (data) × {'×'.join(map(str, sp))} (x×y×z) mesh, "
                         f"{self.technique}: block={m.block}, norm={m.norm}, "
                         f"precision={m.precision}.")
            lines.append(f"  per device: {_fmt(e['total'])} (activations "
                         f"{_fmt(e['activation_bytes'])}, workspace "
                         f"{_fmt(e['workspace_bytes'] + e['halo_bytes'])}, "
                         f"params+grads+optimizer {_fmt(state)}); headroom "
                         f"{_fmt(self.headroom)}.")
            lines.append(f"  each device holds a {'×'.join(map(str, e['local_shape'][1:-1]))} "
                         f"block of {e['local_shape'][0]} volume(s); the whole volume is kept, "
                         f"nothing is cropped.")
        lines.append("Considered (per-device estimate):")
        for tech, mesh, total in self.considered:
            lines.append(f"  {tech:22s} {mesh:18s} "
                         + (_fmt(total) + (" fits" if total <= self.budget else " too big")
                            if total is not None else "no valid split"))
        return "\n".join(lines)


def plan(budget_bytes_per_device: int, n_devices: int, resolution, batch: int = 1,
         preset: str = "paper", model_cfg: ModelConfig | None = None,
         optimizer: str = "adafactor", in_channels: int = 1) -> Plan:
    """Mesh + techniques with the most headroom under the budget (see the module docstring).

    ``resolution``: an int (a cube, and the paper preset's schedule) or the spatial shape.
    """
    shape = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
    if model_cfg is None:
        model_cfg = (unet.preset(preset, shape[0]) if preset == "paper"
                     else unet.preset(preset))
    shape = shape[:model_cfg.dims]
    levels = unet.poolings_of(model_cfg)
    result = Plan(int(budget_bytes_per_device), n_devices, shape, batch, None, None)
    tried = []
    for tech, changes in LADDER:
        cfg = dataclasses.replace(model_cfg, **changes)
        if cfg in tried:  # e.g. the paper presets are bf16 already
            continue
        tried.append(cfg)
        fits = []
        for data in [d for d in _divisors(n_devices) if batch % d == 0][::-1]:
            splits = spatial_splits(n_devices // data, shape, levels, model_cfg.dims)
            mesh_txt = f"{data}×" + ("×".join(map(str, splits[0])) if splits else "?")
            if not splits:
                result.considered.append((tech, mesh_txt, None))
                continue
            est = analytic.estimate(cfg, shape, (data,) + splits[0], optimizer=optimizer,
                                  batch=batch, in_channels=in_channels)
            result.considered.append((tech, mesh_txt, est["total"]))
            if est["total"] <= budget_bytes_per_device:
                fits.append((budget_bytes_per_device - est["total"], data, splits[0], est))
        if fits:
            _, data, split, est = max(fits, key=lambda f: (f[0], f[1]))
            result.mesh, result.model, result.technique = (data,) + split, cfg, tech
            result.estimate = est
            return result
    return result
