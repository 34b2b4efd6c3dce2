"""Which levels to gather: the planner's choice of ``model.gather_below`` for a planned mesh.

``model.gather_below: N`` (parallel/submesh.py) runs a level whose per-device block on a split
mesh axis is below N voxels all-gathered on that axis. Only the distinct block sizes matter:
for a 128³ volume on 4×4×4 devices the blocks are 32, 16, 8, 4 per level, so the candidates
are 0 (never), 5 (the deepest level), 9 (the deepest two), 17, 33 (every level). Each gets the
analytic estimate (analytic.py counts a gathered level whole on its gathered axes, n× its
share); the candidates within :data:`COMPILE_WITHIN` × the smallest estimate are compiled
(confirm.compile_steps: abstract inputs, one subprocess with fake devices when needed) and the
smallest compiled step wins, a tie going to the smaller threshold (0: never). Without a compile
the estimate decides. On an SPMD mesh every device of a gathered axis holds the whole level,
so at batch 1 gathering costs memory; it is there for the latency of tiny collectives.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hrseg.config import ModelConfig
from hrseg.memory import analytic, confirm

# Over benchmarks/results/memory_grid.json the estimate sat between 7 % below and 8.2 % above
# XLA:CPU's compiled step (planner.GRID_ERRORS): a candidate whose estimate is over
# 1.082 / 0.93 ≈ 1.16× the smallest cannot compile below the smallest's, so only those within
# 1.25× (a margin over that) are worth a compile (minutes each at paper scale; only with
# `hrseg memory --compile`).
COMPILE_WITHIN = 1.25


@dataclass
class Candidate:
    below: int                       # model.gather_below
    estimate: dict                   # analytic.estimate with it ("gathered": axes per level)
    compiled: dict | None = None     # confirm.compile_step's figures; None: not compiled

    @property
    def gathers(self) -> str:
        """The levels it gathers and on which mesh axes, e.g. ``"level 3 on xyz"``."""
        runs = []                                   # [first level, last level, axes]
        for lv, a in enumerate(self.estimate["gathered"]):
            if a and runs and runs[-1][1:] == [lv - 1, a]:
                runs[-1][1] = lv
            elif a:
                runs.append([lv, lv, a])
        on = [f"{f}{f'–{t}' if t > f else ''} on {''.join(a)}" for f, t, a in runs]
        many = sum(t - f + 1 for f, t, _ in runs) > 1
        return f"level{'s' if many else ''} {', '.join(on)}" if on else "never"


def thresholds(local, split, levels: int) -> list[int]:
    """0 and one ``gather_below`` per distinct per-level block size on the split axes: ``b + 1``
    gathers every (level, axis) whose block is ``b`` voxels or fewer. ``local``: the input
    shard's spatial sizes ``(X, Y, Z)``; ``split``: devices per spatial axis."""
    blocks = {s // 2 ** lv for s, n in zip(local, split) if n > 1 for lv in range(levels)}
    return [0] + [b + 1 for b in sorted(blocks)]


def candidates(cfg: ModelConfig, shape, mesh, batch: int = 1, optimizer: str = "adafactor",
               in_channels: int = 1, platform: str | None = None) -> list[Candidate]:
    """Every threshold of :func:`thresholds` for ``mesh = (data, sx, sy, sz)``, estimated."""
    def est(below):
        return analytic.estimate(dataclasses.replace(cfg, gather_below=below), shape, mesh,
                                 optimizer=optimizer, batch=batch, in_channels=in_channels,
                                 platform=platform)

    base = est(0)
    local = base["local_shape"][1:-1]                               # (X, Y, Z) of one shard
    return [Candidate(t, base if t == 0 else est(t))
            for t in thresholds(local, mesh[1:1 + cfg.dims], cfg.levels)]


def equivalent(cands: list[Candidate], below: int) -> Candidate:
    """The candidate that gathers what ``gather_below = below`` gathers."""
    return max((c for c in cands if c.below <= below), key=lambda c: c.below)


def choose(cfg: ModelConfig, shape, mesh, batch: int = 1, optimizer: str = "adafactor",
           in_channels: int = 1, where: str | None = None,
           known: dict | None = None,
           platform: str | None = None) -> tuple[Candidate, list[Candidate]]:
    """(the chosen candidate, all of them). ``where=None``: the smallest estimate; else
    (``"auto"`` | ``"here"``) the smallest compiled step among the candidates within
    COMPILE_WITHIN × the smallest estimate. ``known``: ``{gather_below: compile_step()}``
    already compiled (the confirmed pick's). Ties go to the smaller threshold."""
    cands = candidates(cfg, shape, mesh, batch, optimizer, in_channels, platform)
    for below, c in (known or {}).items():
        equivalent(cands, below).compiled = c
    if where is None:
        return min(cands, key=lambda c: (c.estimate["total"], c.below)), cands
    smallest = min(c.estimate["total"] for c in cands)
    todo = [c for c in cands
            if c.compiled is None and c.estimate["total"] <= COMPILE_WITHIN * smallest]
    figures = confirm.compile_steps([dataclasses.replace(cfg, gather_below=c.below)
                                     for c in todo], shape, mesh, batch, optimizer,
                                    in_channels, where)
    for c, f in zip(todo, figures):
        c.compiled = f
    done = [c for c in cands if c.compiled is not None]
    return min(done, key=lambda c: (c.compiled["total"], c.below)), cands


def describe(chosen: Candidate, cands: list[Candidate], batch: int, fmt) -> list[str]:
    """Lines for ``hrseg memory``: the choice and why, then one line per candidate.
    ``fmt(bytes) -> str``."""
    by = "compiled" if chosen.compiled is not None else "estimate"

    def fig(c):
        return (c.compiled or {}).get("total") if by == "compiled" else c.estimate["total"]

    said = "by the compiled step" if by == "compiled" else "by the estimate"
    others = [c for c in cands if c is not chosen and fig(c) is not None]
    never = (f"gathering never pays for memory at batch {batch} here: a gathered level is "
             f"whole on every device of its gathered axes, n× its share")
    if len(cands) == 1:
        why = "no level is split over several devices on a spatial axis: nothing to gather"
    elif chosen.below == 0 and not others:
        why = f"{never} (every other estimate is over {COMPILE_WITHIN:g} × this one)"
    elif chosen.below == 0 and all(fig(c) > fig(chosen) for c in others):
        least = min(others, key=fig)
        why = (f"{never} (the least costly, {least.gathers}, adds "
               f"{fmt(fig(least) - fig(chosen))} {said})")
    elif chosen.below == 0:
        why = f"gathering saves nothing here {said} (a tie goes to 0: never)"
    else:
        why = (f"gathering {chosen.gathers} saves {fmt(fig(cands[0]) - fig(chosen))} against "
               f"never gathering {said}" if fig(cands[0]) is not None else
               f"the smallest figure {said}")
    lines = [(f"Levels gathered (model.gather_below, hrseg/memory/levels.py): chose "
              f"{chosen.below} ({chosen.gathers}): {why}.")]
    smallest = min(c.estimate["total"] for c in cands)
    for c in cands:
        e = c.estimate["total"]
        if c.compiled is not None:
            txt = f"compiled {fmt(c.compiled['total'])} (estimate {fmt(e)})"
        elif by == "compiled":
            txt = (f"not compiled: estimate {fmt(e)} (over {COMPILE_WITHIN:g} × the smallest, "
                   f"{fmt(smallest)})")
        else:
            txt = f"estimate {fmt(e)}, not compiled"
        lines.append(f"  gather_below {c.below:<5d} {c.gathers:34s} {txt}"
                     + ("  <- chosen" if c is chosen else ""))
    return lines


def apply(p, where: str | None) -> None:
    """Give the plan ``p`` (a planner.Plan with a mesh) the chosen ``gather_below``: its model,
    the candidates (``p.gather``) and the choice's figures (``p.estimate``, and ``p.compiled``
    when ``where``: its compiled step, if any, is known and not compiled again)."""
    known = {p.model.gather_below: p.compiled} if where and p.compiled else None
    chosen, p.gather = choose(p.model, p.shape, p.mesh, p.batch, p.optimizer, p.in_channels,
                              where, known, p.platform)
    p.model = dataclasses.replace(p.model, gather_below=chosen.below)
    p.estimate = chosen.estimate
    if where is not None:
        p.compiled = chosen.compiled
