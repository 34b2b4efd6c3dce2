"""Pick a partition and the memory techniques that fit a per-device memory budget.

nnU-Net shrinks the patch until it fits the GPU; here the whole volume is kept and the choice is
how to split it (data × x × y × z) and which of Wang et al.'s techniques to switch on. The
techniques are tried from the least to the most intrusive (bf16, in-place ABN, Compact
ConvBlocks); at the first step where some mesh fits, the mesh with the most headroom wins.
Per-device activations are about the same for every split of the same device count, so the
headroom favours data parallelism (no halos) as far as the batch allows, then cube-like
spatial splits (smallest halo surface). The estimate answers in seconds, within the error
measured over benchmarks/memory.py's grid (GRID_ERRORS); ``compile=`` confirms the
pick with XLA's figure for the step (:func:`confirm_plan`), which may move it either way.
On the pick's mesh, levels.py then chooses which levels run gathered (``model.gather_below``)
by the same figure; splits.py lists the meshes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hrseg.config import ModelConfig
from hrseg.memory import analytic, confirm, levels
from hrseg.memory.splits import divisors, spatial_splits, why_not
from hrseg.nn import unet

# (label, changes to the ModelConfig), cumulative, least intrusive first
LADDER = (
    ("as configured", {}),
    ("bf16 compute", {"precision": "bf16"}),
    ("+ in-place ABN", {"precision": "bf16", "norm": "inplace_abn"}),
    ("+ Compact ConvBlocks", {"precision": "bf16", "norm": "inplace_abn", "block": "compact"}),
)


# How far memory.estimate sat from XLA's compiled figure over this project's grid of steps
# (benchmarks/memory.py --part grid, benchmarks/results/memory_grid.json: the worst error per
# precision); `hrseg memory` answers the estimate unless asked to --compile.
# (lowest, highest) of (estimate − compiled) / compiled per precision, XLA:CPU;
# tests/test_planner.py checks them against the committed JSON.
GRID_ERRORS = {"bf16": (-0.069, 0.007), "fp32": (-0.070, 0.082)}
ESTIMATE_OVER_COMPILED = " and ".join(f"{lo * 100:+.0f} %…{hi * 100:+.0f} % ({p})"
                                      for p, (lo, hi) in GRID_ERRORS.items())


def _fmt(b: float) -> str:
    return f"{b / analytic.GiB:.2f} GiB" if b >= analytic.GiB / 10 else f"{b / 2 ** 20:.2f} MiB"


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
    optimizer: str = "adafactor"
    in_channels: int = 1
    base: ModelConfig | None = None      # the model before the ladder's changes
    used: str = "analytic"               # which figure picked: "analytic" | "compiled"
    compiled: dict = field(default_factory=dict)   # compile_step() of the pick (used=compiled)
    analytic: Plan | None = None         # the estimate's own pick, when the compile changed it
    checked: list[tuple[str, str, int, int]] = field(default_factory=list)
    # (technique, mesh, estimate, compiled total) of every compile the confirmation made
    gather: list = field(default_factory=list)  # levels.Candidate per gather_below weighed
    platform: str = "cpu"                # whose compiler the estimate counts for (analytic.py)

    @property
    def total(self) -> int | None:
        """Per-device bytes of the pick by the figure that picked it."""
        if self.mesh is None:
            return None
        return self.compiled["total"] if self.used == "compiled" else self.estimate["total"]

    def yaml_lines(self) -> list[str]:
        """The run-config lines that apply the plan (mesh and model sections)."""
        if self.mesh is None:
            return []
        d, *sp = self.mesh
        m = self.model
        return ["mesh:", "  backend: halo", f"  data: {d}",
                f"  spatial: [{', '.join(map(str, sp))}]", "model:", f"  block: {m.block}",
                f"  norm: {m.norm}", f"  precision: {m.precision}",
                f"  gather_below: {m.gather_below}",
                "train:", f"  batch: {self.batch}"]

    def why_no_split(self) -> str | None:
        """Why no mesh of ``n_devices`` can split the volume, or None if some can."""
        if any(t is not None for _, _, t in self.considered):
            return None
        return why_not(self.n_devices, self.shape, self.batch, self.levels)

    @property
    def headroom(self) -> int:
        return self.budget - self.total if self.mesh else -1

    def _mesh_txt(self) -> str:
        d, *sp = self.mesh
        return f"{d} (data) × {'×'.join(map(str, sp))} (x×y×z) mesh"

    def explain(self) -> str:
        shape = "×".join(map(str, self.shape))
        lines = [(f"Volume {shape}, batch {self.batch}, {self.n_devices} devices, "
                  f"budget {_fmt(self.budget)} per device, {self.platform.upper()} devices"
                  + (" (--platform gpu|tpu plans for accelerators)" if self.platform == "cpu"
                     else "") + ".")]
        if self.mesh is None:
            best = min((t for _, _, t in self.considered if t), default=None)
            why = self.why_no_split()
            lines.append("Nothing fits" + (f": the smallest estimate is {_fmt(best)} per "
                                           f"device" if best else "")
                         + (", and no compiled step fits either" if self.checked else "") + "."
                         + (f" {why}." if why else ""))
            s = self.suggestion
            if s is not None and s.mesh is not None:
                lines.append(f"It would fit on {s.n_devices} devices: {s._mesh_txt()}, "
                             f"{s.technique}, {_fmt(s.total)} per device ({s.used}"
                             + (f"; the estimate says {_fmt(s.estimate['total'])}"
                                if s.used == "compiled" else "")
                             + f") (`hrseg memory --devices {s.n_devices} ...`).")
            elif best is not None:
                lines.append(f"More devices (up to {MAX_DEVICES}) would not make it fit: the "
                             f"volume cannot be split further, or what every device holds "
                             f"whole (parameters, optimizer state) is too big for the budget.")
        else:
            e = self.estimate
            m = self.model
            state = e["param_bytes"] + e["gradient_bytes"] + e["optimizer_bytes"]
            lines.append(f"Plan: {self._mesh_txt()}, {self.technique}: block={m.block}, "
                         f"norm={m.norm}, precision={m.precision}.")
            if self.used == "compiled":
                c = self.compiled
                where = ("in a subprocess on fake CPU devices" if c.get("where") ==
                         "subprocess" else "in this process")
                lines.append(f"  per device: {_fmt(c['total'])} compiled (XLA memory_analysis "
                             f"of the step, compiled {where}: arguments "
                             f"{_fmt(c['argument'])}, temporaries {_fmt(c['temp'])}) — the "
                             f"figure used; analytic estimate {_fmt(e['total'])}; headroom "
                             f"{_fmt(self.headroom)}.")
            else:
                lines.append(f"  per device: {_fmt(e['total'])} analytic estimate (activations "
                             f"kept {_fmt(e['kept_bytes'])}, backward workspace "
                             f"{_fmt(e['workspace_bytes'])}, params+grads+optimizer "
                             f"{_fmt(state)}) — the figure used, not compiled; headroom "
                             f"{_fmt(self.headroom)}.")
            lines.append(f"  each device holds a {'×'.join(map(str, e['local_shape'][1:-1]))} "
                         f"block of {e['local_shape'][0]} volume(s); the whole volume is kept, "
                         f"nothing is cropped.")
            lines.append("Run-config lines (YAML) that apply it:")
            lines += ["    " + y for y in self.yaml_lines()]
            if self.used == "analytic":
                lines.append(f"  The estimate is not compiled: over this project's grid of "
                             f"steps it was within {ESTIMATE_OVER_COMPILED} of XLA's compiled "
                             f"figure (benchmarks/results/memory_grid.json; below it at worst "
                             f"by {-100 * min(lo for lo, _ in GRID_ERRORS.values()):.0f} %, so "
                             f"keep that much headroom or confirm it); `hrseg memory "
                             f"--compile` confirms it by compiling the step (minutes)."
                             + ("" if self.platform == "cpu" else
                                f" That grid is XLA:CPU's; for {self.platform.upper()} devices "
                                f"the estimate leaves out the CPU's float32 widening of 16-bit "
                                f"convs, and was not measured against their compiler here."))
        if self.mesh is not None and self.gather:
            lines += levels.describe(levels.equivalent(self.gather, self.model.gather_below),
                                     self.gather, self.batch, _fmt)
        a = self.analytic
        if a is not None:
            lines.append("The analytic estimate alone picked "
                         + (f"{a._mesh_txt()}, {a.technique} ({_fmt(a.estimate['total'])})"
                            if a.mesh else "nothing") + "; the compiled step changed the pick.")
        lines.append("Considered (per-device estimate):")
        for tech, mesh, total in self.considered:
            lines.append(f"  {tech:22s} {mesh:18s} "
                         + (_fmt(total) + (" fits" if total <= self.budget else " too big")
                            if total is not None else "no valid split"))
        if self.checked:
            lines.append("Compiled (XLA memory_analysis per device, abstract inputs):")
            for tech, mesh, est, total in self.checked:
                lines.append(f"  {tech:22s} {mesh:18s} {_fmt(total)} "
                             f"{'fits' if total <= self.budget else 'too big'} "
                             f"(estimate {_fmt(est)})")
        return "\n".join(lines)


MAX_DEVICES = 4096  # how far "nothing fits" looks for a device count that would


MAX_PLAN_DEVICES = 65536   # the largest machine a plan is made for (a TPU v5p pod is 8960)
MAX_SIZE = 8192            # voxels per axis (the paper's volumes are 512)


def check_request(budget, n_devices, shape, batch) -> None:
    """Bounds on what a plan is asked for, so it answers at once (one line naming the flag)."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"--budget: must be a finite size > 0, got {budget}")
    if not 1 <= int(n_devices) <= MAX_PLAN_DEVICES:
        raise ValueError(f"--devices {n_devices}: must be in 1..{MAX_PLAN_DEVICES}")
    if len(shape) not in (1, 2, 3) or not all(1 <= int(s) <= MAX_SIZE for s in shape):
        raise ValueError(f"--resolution {' '.join(map(str, shape))}: give 1 or 3 sizes in "
                         f"1..{MAX_SIZE}")
    if not 1 <= int(batch) <= MAX_PLAN_DEVICES:
        raise ValueError(f"--batch {batch}: must be in 1..{MAX_PLAN_DEVICES}")


def plan(budget_bytes_per_device: int, n_devices: int, resolution, batch: int = 1,
         preset: str = "paper", model_cfg: ModelConfig | None = None,
         optimizer: str = "adafactor", in_channels: int = 1, suggest: bool = True,
         compile: str | None = None, choose_gather: bool = True,
         platform: str | None = None) -> Plan:
    """Mesh + techniques with the most headroom under the budget (see the module docstring).

    ``resolution``: an int (a cube, and the paper preset's schedule) or the spatial shape, any
    size per axis. ``compile``: None picks by the analytic estimate alone; ``"auto"`` or
    ``"here"`` then confirms the pick by compiling the step (:func:`confirm_plan`; where the
    compile runs: hrseg/memory/confirm.py). ``choose_gather``: also choose which levels run
    gathered (``model.gather_below``, hrseg/memory/levels.py), by the same figure.
    ``platform``: "cpu" | "gpu" | "tpu", the devices planned for (default: this process's JAX
    backend; analytic.estimate).
    """
    shape = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
    check_request(budget_bytes_per_device, n_devices, shape, batch)
    if model_cfg is None:
        model_cfg = (unet.preset(preset, shape[0]) if preset == "paper"
                     else unet.preset(preset))
    shape = shape[:model_cfg.dims]
    poolings = unet.poolings_of(model_cfg)
    if n_devices < 1:
        raise ValueError(f"--devices {n_devices}: need at least 1 device")
    result = Plan(int(budget_bytes_per_device), n_devices, shape, batch, None, None,
                  levels=poolings, optimizer=optimizer, in_channels=in_channels, base=model_cfg,
                  platform=analytic.platform_of(platform))
    for tech, cfg in _ladder(model_cfg):
        opts = _options(result, cfg)
        result.considered += [(tech, txt, total) for txt, total, _ in opts]
        fits = [o for o in opts if o[1] is not None and o[1] <= budget_bytes_per_device]
        if fits:
            _, _, (mesh, est) = min(fits, key=lambda o: (o[1], -o[2][0][0]))
            result.mesh, result.model, result.technique, result.estimate = mesh, cfg, tech, est
            if choose_gather:
                levels.apply(result, None)
            break
    if result.mesh is None and suggest:
        result.suggestion = _suggest(result, model_cfg, optimizer, in_channels)
    return confirm_plan(result, compile, suggest, choose_gather) if compile else result


def _ladder(model_cfg: ModelConfig) -> list[tuple[str, ModelConfig]]:
    """LADDER applied to the model, each distinct config once (the paper presets are bf16)."""
    out = []
    for tech, changes in LADDER:
        cfg = dataclasses.replace(model_cfg, **changes)
        if all(cfg != c for _, c in out):
            out.append((tech, cfg))
    return out


def _options(p: Plan, cfg: ModelConfig):
    """(mesh text, estimate total or None, ((data, sx, sy, sz), estimate) or None) for each
    data-parallel degree of ``p.n_devices``, the most data-parallel first."""
    out = []
    for data in [d for d in divisors(p.n_devices) if p.batch % d == 0][::-1]:
        splits = spatial_splits(p.n_devices // data, p.shape, p.levels, cfg.dims)
        txt = f"{data}×" + ("×".join(map(str, splits[0])) if splits else "?")
        if not splits:
            out.append((txt, None, None))
            continue
        est = analytic.estimate(cfg, p.shape, (data,) + splits[0], optimizer=p.optimizer,
                                batch=p.batch, in_channels=p.in_channels, platform=p.platform)
        out.append((txt, est["total"], ((data,) + splits[0], est)))
    return out


def confirm_plan(p: Plan, where: str = "auto", suggest: bool = True,
                 choose_gather: bool = True) -> Plan:
    """The plan confirmed by compiling: the least intrusive technique whose compiled step fits.

    Compiles the analytic pick's step (its best mesh by the estimate); if it fits, walks down
    the ladder while the less intrusive technique's compiled step fits too; if not, walks up
    until one fits. Nothing fitting on ``p.n_devices``: the most intrusive technique is compiled
    in case the estimate was too high, and the suggestion (fewest devices) is confirmed the
    same way, walking down or up the device counts. Each compile takes seconds, allocates
    nothing; ``p.checked`` lists them. Returns a new Plan (``used="compiled"``).
    """
    steps = _ladder(p.base)
    best = {}

    def fits(i):  # compiled step of the i-th technique's best mesh, or False (no split)
        opts = [o[2] for o in _options(p, steps[i][1]) if o[2] is not None]
        if not opts:
            return False
        (mesh, est), (tech, cfg) = min(opts, key=lambda o: (o[1]["total"], -o[0][0])), steps[i]
        c = confirm.compile_step(cfg, p.shape, mesh, p.batch, p.optimizer, p.in_channels, where)
        out.checked.append((tech, "×".join(map(str, mesh)), est["total"], c["total"]))
        best[i] = (mesh, est, c)
        return c["total"] <= p.budget

    out = dataclasses.replace(p, checked=[], used="compiled", suggestion=None, analytic=None,
                              gather=[])
    start = ([t for t, _ in steps].index(p.technique) if p.mesh is not None
             else len(steps) - 1)
    if p.why_no_split() is not None:  # no mesh of n_devices splits the volume
        pick = None
    elif fits(start):
        pick = start
        while pick > 0 and fits(pick - 1):
            pick -= 1
    else:
        pick = next((i for i in range(start + 1, len(steps)) if fits(i)), None)
    if pick is not None:
        (mesh, est, c), (tech, cfg) = best[pick], steps[pick]
        out.mesh, out.model, out.technique, out.estimate, out.compiled = mesh, cfg, tech, est, c
        if choose_gather:
            levels.apply(out, where)
    else:
        out.mesh = out.model = None
        out.technique, out.estimate = "", {}
        out.suggestion = _confirm_suggestion(p, where) if suggest else None
    if (out.mesh, out.technique) != (p.mesh, p.technique):
        out.analytic = p
    return out


def _confirm_suggestion(p: Plan, where: str) -> Plan | None:
    """The fewest devices (doubling from ``p.n_devices``) whose confirmed plan fits: from the
    analytic suggestion down while it still fits, or up (at most 3 doublings) until it does."""
    if p.suggestion is None:  # the volume splits no further, or more devices stop helping
        return None
    kw = {"model_cfg": p.base, "optimizer": p.optimizer, "in_channels": p.in_channels,
          "suggest": False, "compile": where, "choose_gather": False, "platform": p.platform}
    n = p.suggestion.n_devices
    s = plan(p.budget, n, p.shape, p.batch, **kw)
    if s.mesh is not None:
        while n // 2 > p.n_devices:
            fewer = plan(p.budget, n // 2, p.shape, p.batch, **kw)
            if fewer.mesh is None:
                break
            n, s = n // 2, fewer
        return s
    for _ in range(3):
        n *= 2
        if n > MAX_DEVICES or not spatial_splits(n, p.shape, p.levels, p.base.dims):
            return None
        s = plan(p.budget, n, p.shape, p.batch, **kw)
        if s.mesh is not None:
            return s
    return None


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
                                batch=failed.batch, in_channels=in_channels,
                                platform=failed.platform)["total"]
        if total <= failed.budget:
            return plan(failed.budget, n, failed.shape, failed.batch, model_cfg=model_cfg,
                        optimizer=optimizer, in_channels=in_channels, suggest=False,
                        choose_gather=False, platform=failed.platform)
        if prev is not None and total >= 0.99 * prev:
            return None
        n, prev = n * 2, total
    return None
