"""The planner's choice of ``model.gather_below`` (hrseg/memory/levels.py): the candidate
thresholds come from the per-level block sizes, only those within COMPILE_WITHIN × the smallest
estimate are compiled, the smallest compiled step wins (ties: 0), and without a compile the
estimate decides. Single device: the compile is replaced where a mesh would need more (the real
compile on 8 fake devices: tests/multidevice/test_planner_levels_sharded.py)."""
import dataclasses

import pytest

from hrseg import cli, config, memory
from hrseg.memory import analytic, confirm, levels, planner
from hrseg.nn import unet
from hrseg.parallel import submesh

TINY = unet.preset("tiny")                       # levels 2: blocks 16, 8 at 32³ on 2×2×2
SHAPE = (32, 32, 32)
MESH = (1, 2, 2, 2)


@pytest.fixture
def wide_window(monkeypatch):
    """COMPILE_WITHIN 1.6: gathering level 1 (9) is estimated at 1.53× never (0), so that both
    compile and the choice is between compiled figures; 17 (7.5×) stays out."""
    monkeypatch.setattr(levels, "COMPILE_WITHIN", 1.6)


def _counting(monkeypatch, total):
    """Replace the compile (confirm.compile_steps, which compile_step calls) by
    ``total(gather_below, estimate)``; returns the gather_below of every step compiled."""
    calls = []

    def fake(cfgs, shape, mesh, batch=1, optimizer="adafactor", in_channels=1, where="auto"):
        out = []
        for cfg in cfgs:
            calls.append(cfg.gather_below)
            est = analytic.estimate(cfg, shape, mesh, optimizer=optimizer, batch=batch,
                                    in_channels=in_channels)["total"]
            out.append({"total": int(total(cfg.gather_below, est)), "argument": 0, "temp": 0,
                        "where": "here"})
        return out

    monkeypatch.setattr(confirm, "compile_steps", fake)
    return calls


def test_thresholds_are_one_per_distinct_block_size_on_the_split_axes():
    assert levels.thresholds((32, 32, 32), (4, 4, 4), 4) == [0, 5, 9, 17, 33]
    # blocks x 8, 4, 2 · y 4, 2, 1 · z 12, 6, 3 (tests/multidevice/test_submesh_sharded.py)
    assert levels.thresholds((8, 4, 12), (2, 2, 2), 3) == [0, 2, 3, 4, 5, 7, 9, 13]
    assert levels.thresholds((8, 4, 12), (2, 1, 1), 3) == [0, 3, 5, 9]      # x only
    assert levels.thresholds((16, 16, 16), (1, 1, 1), 2) == [0]             # nothing split
    # every gather_below gathers what one of the candidates does, and they all differ
    local, split, n = (8, 4, 12), (2, 2, 2), 3
    cands = levels.thresholds(local, split, n)

    def plan(g):
        return submesh.level_plan((1, *local, 1), n, g, devices=split)

    assert len({str(plan(t)) for t in cands}) == len(cands)
    for g in range(20):
        assert plan(g) == plan(max(t for t in cands if t <= g)), g


def test_a_gathered_level_is_estimated_whole_on_its_gathered_axes():
    """Gathering every level on all three axes: each device holds what one device holds for
    the whole volume (but the loss, which runs on its own block)."""
    cands = levels.candidates(TINY, SHAPE, MESH)
    assert [c.below for c in cands] == [0, 9, 17]
    assert [c.estimate["gathered"] for c in cands] == [
        [(), ()], [(), ("x", "y", "z")], [("x", "y", "z")] * 2]
    assert [c.gathers for c in cands] == ["never", "level 1 on xyz", "levels 0–1 on xyz"]
    one = memory.estimate(TINY, SHAPE, (1, 1, 1, 1))

    def kept(est, loss):
        return sum(t["bytes"] for t in est["layers"] if t["name"].startswith("log") == loss)

    assert kept(cands[2].estimate, False) == kept(one, False)
    assert kept(cands[2].estimate, True) * 8 == kept(one, True) == 8 * kept(cands[0].estimate,
                                                                             True)
    est = [c.estimate["total"] for c in cands]
    assert est[0] < est[1] < est[2]              # batch 1: gathering costs memory


def test_only_candidates_within_compile_within_of_the_smallest_estimate_are_compiled(
        monkeypatch):
    calls = _counting(monkeypatch, lambda below, est: est)
    chosen, cands = levels.choose(TINY, SHAPE, MESH, where="here")
    smallest = min(c.estimate["total"] for c in cands)
    within = [c.below for c in cands
              if c.estimate["total"] <= levels.COMPILE_WITHIN * smallest]
    assert 0 < len(within) < len(cands)          # the rule leaves one out here
    assert calls == within
    assert [c.compiled is not None for c in cands] == [c.below in within for c in cands]
    assert chosen.below == 0
    # the confirmed pick's compile is known: it is not compiled again
    calls.clear()
    levels.choose(TINY, SHAPE, MESH, where="here", known={0: {"total": 1}})
    assert 0 not in calls and calls == within[1:]


@pytest.mark.parametrize("compiled,want", [
    ({0: 100, 9: 90}, 9),        # the smallest compiled step wins
    ({0: 100, 9: 100}, 0),       # a tie goes to the smaller threshold: never
    ({0: 100, 9: 130}, 0),
])
def test_choice_is_the_smallest_compiled_step_ties_to_0(monkeypatch, wide_window, compiled,
                                                        want):
    _counting(monkeypatch, lambda below, est: compiled[below])
    chosen, cands = levels.choose(TINY, SHAPE, MESH, where="here")
    assert chosen.below == want and chosen.compiled["total"] == min(compiled.values())
    text = "\n".join(levels.describe(chosen, cands, 1, planner._fmt))
    assert f"chose {want} (" in text and text.count("<- chosen") == 1
    assert "not compiled: estimate" in text      # 17: over 1.6 × the smallest estimate
    if want == 9:
        assert "gathering level 1 on xyz saves" in text
    else:
        assert ("never pays" if compiled[9] > 100 else "a tie goes to 0") in text


def test_without_a_compile_the_estimate_decides(monkeypatch):
    calls = _counting(monkeypatch, lambda below, est: est)
    chosen, cands = levels.choose(TINY, SHAPE, MESH)
    assert chosen.below == 0 and calls == [] and all(c.compiled is None for c in cands)
    real = analytic.estimate

    def cheaper_gathered(cfg, *a, **k):  # an estimate in which gathering level 1 pays
        out = real(cfg, *a, **k)
        return out | {"total": 1} if cfg.gather_below == 9 else out

    monkeypatch.setattr(analytic, "estimate", cheaper_gathered)
    chosen, _ = levels.choose(TINY, SHAPE, MESH)
    assert chosen.below == 9 and calls == []


def test_plan_records_the_choice_and_reuses_the_confirmed_compile(monkeypatch, wide_window):
    calls = _counting(monkeypatch, lambda below, est: {0: 500, 9: 400}.get(below, 10 * est))
    p = planner.plan(2 ** 30, 8, 32, model_cfg=TINY, compile="here")
    assert p.mesh == MESH and calls == [0, 9]   # the pick's compile, then 9 (17: over 2×)
    assert p.model.gather_below == 9 and p.total == p.compiled["total"] == 400
    assert p.estimate == levels.equivalent(p.gather, 9).estimate
    assert "  gather_below: 9" in p.yaml_lines()
    assert [c.below for c in p.gather] == [0, 9, 17]
    a = planner.plan(2 ** 30, 8, 32, model_cfg=TINY)           # by the estimate: never
    assert a.model.gather_below == 0 and a.gather and calls == [0, 9]
    assert a.estimate["total"] == min(c.estimate["total"] for c in a.gather)
    off = planner.plan(2 ** 30, 8, 32, model_cfg=dataclasses.replace(TINY, gather_below=5),
                       choose_gather=False)
    assert off.gather == [] and off.model.gather_below == 5


def test_cli_prints_the_choice_and_one_line_per_candidate(capsys, tmp_path):
    argv = ["memory", "--resolution", "32", "--devices", "8", "--preset", "tiny",
            "--budget", "1GiB", "--compile", "no"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Levels gathered (model.gather_below, hrseg/memory/levels.py): chose 0 (never): " \
           "gathering never pays for memory at batch 1 here" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("gather_below ")]
    assert [r.split()[1] for r in rows] == ["0", "9", "17"]
    assert all("estimate" in r for r in rows) and rows[0].endswith("<- chosen")
    f = tmp_path / "run.yaml"                      # the printed YAML carries the choice
    f.write_text("\n".join(line[4:] for line in out.splitlines() if line.startswith("    ")))
    assert config.load(f).model.gather_below == 0


def test_one_device_has_nothing_to_gather():
    p = planner.plan(2 ** 30, 1, 32, model_cfg=TINY)
    assert [c.below for c in p.gather] == [0] and "nothing to gather" in p.explain()
