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


# How far memory.estimate sat above XLA's compiled figure in this project's measurements
# (benchmarks/memory.py PM3: paper(512), 512 devices): the estimate is an upper bound.
ESTIMATE_OVER_COMPILED = "19 % (bf16) to 44 % (fp32)"


def _fmt(b: float) -> str:
    return f"{b / analytic.GiB:.2f} GiB"


def _primes(n: int) -> list[int]:
    """The distinct prime factors of ``n``."""
    return [p for p in range(2, n + 1) if n % p == 0 and all(p % q for q in range(2, p))]


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
    levels: int = 0                      # poolings of the network (for the divisibility rule)
    suggestion: Plan | None = None       # nothing fits: the fewest devices that would

    def yaml_lines(self) -> list[str]:
        """The run-config lines that apply the plan (mesh and model sections)."""
        if self.mesh is None:
            return []
        d, *sp = self.mesh
        m = self.model
        return ["mesh:", "  backend: halo", f"  data: {d}",
                f"  spatial: [{', '.join(map(str, sp))}]", "model:", f"  block: {m.block}",
                f"  norm: {m.norm}", f"  precision: {m.precision}",
                "train:", f"  batch: {self.batch}"]

    def why_no_split(self) -> str | None:
        """Why no mesh of ``n_devices`` can split the volume, or None if some can."""
        if any(t is not None for _, _, t in self.considered):
            return None
        mult = 2 ** self.levels
        shape = "×".join(map(str, self.shape))
        ok = [n for n in range(1, 2 * self.n_devices + 1)
              if any(spatial_splits(n // d, self.shape, self.levels, len(self.shape))
                     for d in _divisors(n) if self.batch % d == 0)]
        below = max((n for n in ok if n < self.n_devices), default=None)
        above = min((n for n in ok if n > self.n_devices), default=None)
        near = " or ".join(str(n) for n in (below, above) if n)
        blocks = [s // mult for s in self.shape]
        stuck = [p for p in _primes(self.n_devices)
                 if all(b % p for b in blocks) and self.batch % p]
        detail = (f" ({self.n_devices} has the factor {stuck[0]}, which divides none of the "
                  f"{', '.join(map(str, blocks))} blocks per axis nor the batch)" if stuck else "")
        return (f"{self.n_devices} devices cannot split a {shape} volume (batch {self.batch}): "
                f"each device's block must be a whole multiple of 2^{self.levels} = {mult} "
                f"voxels per axis (one per pooling), so the devices on an axis must divide its "
                f"size / {mult}{detail}"
                + (f"; nearest device counts that work: {near}" if near else ""))

    @property
    def headroom(self) -> int:
        return self.budget - self.estimate.get("total", self.budget) if self.mesh else -1

    def explain(self) -> str:
        shape = "×".join(map(str, self.shape))
        lines = [(f"Volume {shape}, batch {self.batch}, {self.n_devices} devices, "
                  f"budget {_fmt(self.budget)} per device.")]
        if self.mesh is None:
            best = min((t for _, _, t in self.considered if t), default=None)
            why = self.why_no_split()
            lines.append("Nothing fits" + (f": the smallest estimate is {_fmt(best)} per "
                                           f"device" if best else "") + "."
                         + (f" {why}." if why else ""))
            s = self.suggestion
            if s is not None and s.mesh is not None:
                d, *sp = s.mesh
                lines.append(f"It would fit on {s.n_devices} devices: {d} (data) × "
                             f"{'×'.join(map(str, sp))} (x×y×z) mesh, {s.technique}, "
                             f"{_fmt(s.estimate['total'])} per device "
                             f"(`hrseg memory --devices {s.n_devices} ...`).")
            elif best is not None:
                lines.append(f"More devices (up to {MAX_DEVICES}) would not make it fit: the "
                             f"volume cannot be split further, or what every device holds "
                             f"whole (parameters, optimizer state) is too big for the budget.")
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
            lines.append("Run-config lines (YAML) that apply it:")
            lines += ["    " + y for y in self.yaml_lines()]
            lines.append(f"  The estimate is an upper bound: in this project's measurements it "
                         f"exceeded XLA's compiled figure by {ESTIMATE_OVER_COMPILED} "
                         f"(benchmarks/memory.py, PM3).")
        lines.append("Considered (per-device estimate):")
        for tech, mesh, total in self.considered:
            lines.append(f"  {tech:22s} {mesh:18s} "
                         + (_fmt(total) + (" fits" if total <= self.budget else " too big")
                            if total is not None else "no valid split"))
        return "\n".join(lines)


MAX_DEVICES = 4096  # how far "nothing fits" looks for a device count that would


def plan(budget_bytes_per_device: int, n_devices: int, resolution, batch: int = 1,
         preset: str = "paper", model_cfg: ModelConfig | None = None,
         optimizer: str = "adafactor", in_channels: int = 1, suggest: bool = True) -> Plan:
    """Mesh + techniques with the most headroom under the budget (see the module docstring).

    ``resolution``: an int (a cube, and the paper preset's schedule) or the spatial shape.
    """
    shape = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
    if model_cfg is None:
        model_cfg = (unet.preset(preset, shape[0]) if preset == "paper"
                     else unet.preset(preset))
    shape = shape[:model_cfg.dims]
    levels = unet.poolings_of(model_cfg)
    if n_devices < 1:
        raise ValueError(f"--devices {n_devices}: need at least 1 device")
    result = Plan(int(budget_bytes_per_device), n_devices, shape, batch, None, None,
                  levels=levels)
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
    if suggest:
        result.suggestion = _suggest(result, model_cfg, optimizer, in_channels)
    return result


def _suggest(failed: Plan, model_cfg: ModelConfig, optimizer: str, in_channels: int):
    """The fewest devices (doubling) on which the plan would fit, or None.

    Scans with every technique on (the lowest estimate), spatial splits only, and stops when
    the volume cannot be split further or more devices stop helping (state-bound budgets)."""
    cfg = dataclasses.replace(model_cfg, **LADDER[-1][1])
    n, prev = failed.n_devices * 2, None
    while n <= MAX_DEVICES:
        splits = spatial_splits(n, failed.shape, failed.levels, model_cfg.dims)
        if not splits:
            return None
        total = analytic.estimate(cfg, failed.shape, (1,) + splits[0], optimizer=optimizer,
                                batch=failed.batch, in_channels=in_channels)["total"]
        if total <= failed.budget:
            return plan(failed.budget, n, failed.shape, failed.batch, model_cfg=model_cfg,
                        optimizer=optimizer, in_channels=in_channels, suggest=False)
        if prev is not None and total >= 0.99 * prev:
            return None
        n, prev = n * 2, total
    return None
