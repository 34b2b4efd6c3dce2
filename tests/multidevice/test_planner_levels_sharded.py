"""The planner's gather_below (hrseg/memory/levels.py) on a real compile: a tiny U-Net at 32³ on
2×2×2 of the 8 fake devices. Candidates 0 (never), 9 (level 1 gathered), 17 (both levels);
the ones within COMPILE_WITHIN (here 1.6) × the smallest estimate are compiled here (seconds
each)."""
from hrseg.memory import levels, planner
from hrseg.nn import unet


def test_chosen_gather_below_has_the_smallest_compiled_step(monkeypatch):
    # the estimate puts level 1 gathered (9) at 1.53× never (0): widen the compile window so
    # that two candidates compile and the choice is between compiled figures
    monkeypatch.setattr(levels, "COMPILE_WITHIN", 1.6)
    p = planner.plan(2 ** 30, 8, 32, model_cfg=unet.preset("tiny"), compile="here")
    assert p.mesh == (1, 2, 2, 2) and p.used == "compiled"
    assert [c.below for c in p.gather] == [0, 9, 17]
    done = [c for c in p.gather if c.compiled is not None]
    smallest = min(c.estimate["total"] for c in p.gather)
    assert [c.below for c in done] == [c.below for c in p.gather
                                       if c.estimate["total"] <= levels.COMPILE_WITHIN * smallest]
    assert len(done) >= 2 and all(c.compiled["where"] == "here" for c in done)
    # gather_below reached the compiled step: each candidate compiles to its own figure
    assert len({c.compiled["total"] for c in done}) == len(done)
    chosen = levels.equivalent(p.gather, p.model.gather_below)
    assert chosen.below == p.model.gather_below
    assert p.total == chosen.compiled["total"] == min(c.compiled["total"] for c in done)
    assert "<- chosen" in p.explain()
