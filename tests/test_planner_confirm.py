"""The planner confirmed by compiling: its figure is XLA's memory_analysis of the step, the pick
moves when the compile disagrees with the estimate, and `hrseg memory` says which it used.

Tiny model on a 16×8×8 volume (a different size per axis): each compile takes seconds."""

import dataclasses

import jax
import pytest

from hrseg import cli, memory
from hrseg.memory import analytic, compiled, confirm, planner
from hrseg.nn import precision, unet
from hrseg.parallel import partition

SHAPE = (16, 8, 8)
TINY = unet.preset("tiny")                      # fp32: the ladder has a step to take
LADDER = dict(planner._ladder(TINY))


@pytest.fixture(scope="module")
def figures():
    """(estimate, compiled) total per technique of the ladder, one device."""
    return {t: (memory.estimate(c, SHAPE, (1, 1, 1, 1), batch=1)["total"],
                memory.measure(c, SHAPE, (1, 1, 1, 1), batch=1)["total"])
            for t, c in LADDER.items() if t in ("as configured", "bf16 compute",
                                                "+ in-place ABN")}


def _memory_analysis_total(cfg, mesh):
    """argument + output − alias + temp of the jitted step, compiled here without measure()."""
    lay = partition.layout(partition.make_mesh(mesh[1:], mesh[0],
                                               devices=jax.devices()[:1]), "halo")
    cfg = analytic.with_precision(cfg, precision.policy(cfg.precision).name)
    fn, args = compiled.abstract_step(cfg, (1, *SHAPE, 1), lay)
    ma = fn.lower(*args).compile().memory_analysis()
    return (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes)


def test_confirmed_figure_is_the_compiled_steps_memory_analysis(figures):
    p = planner.plan(64 * 2 ** 20, 1, SHAPE, model_cfg=TINY, compile="here")
    assert p.used == "compiled" and p.technique == "as configured" and p.analytic is None
    assert p.total == p.compiled["total"] == _memory_analysis_total(p.model, p.mesh)
    assert p.estimate["total"] == figures["as configured"][0] != p.total
    text = p.explain()
    assert f"{p.total / 2 ** 20:.2f} MiB compiled" in text and "the figure used" in text
    assert f"analytic estimate {p.estimate['total'] / 2 ** 20:.2f} MiB" in text


def _estimate_scaled(monkeypatch, technique, factor):
    """The planner's estimate of ``technique``'s rung scaled by ``factor`` (the others as they
    are): the estimate is within −7 %…+12 % of the compile over the grid, too close at this
    size for a budget to fall between the two, so the disagreement is made, not found."""
    real, rung = analytic.estimate, LADDER[technique]

    def scaled(cfg, *a, **k):
        out = real(cfg, *a, **k)
        same = dataclasses.replace(cfg, gather_below=0) == dataclasses.replace(rung,
                                                                             gather_below=0)
        return out | {"total": int(out["total"] * factor)} if same else out

    monkeypatch.setattr(analytic, "estimate", scaled)


def test_pick_walks_down_when_the_compile_says_less_intrusive_fits(figures, monkeypatch):
    """The estimate says fp32 does not fit; its compiled step does: the pick walks down to it
    from the estimate's (more intrusive) pick."""
    _estimate_scaled(monkeypatch, "as configured", 2.0)
    est32, comp32 = figures["as configured"]
    budget = comp32                                   # fp32 fits, the estimate (×2) says not
    assert 2 * est32 > budget
    analytic_only = planner.plan(budget, 1, SHAPE, model_cfg=TINY)
    assert analytic_only.technique != "as configured" and analytic_only.used == "analytic"
    assert analytic_only.mesh is not None
    p = planner.plan(budget, 1, SHAPE, model_cfg=TINY, compile="here")
    assert p.technique == "as configured" and p.model.precision == "fp32"
    assert p.total == comp32 <= budget
    assert p.analytic.technique == analytic_only.technique
    checked = [t for t, *_ in p.checked]
    assert checked[0] == analytic_only.technique and checked[-1] == "as configured"
    assert "the compiled step changed the pick" in p.explain()


def test_pick_walks_up_when_the_compile_says_the_analytic_pick_does_not_fit(figures,
                                                                            monkeypatch):
    """The estimate says bf16 fits (halved); its compiled step does not: the pick walks up to
    the next rung whose compiled step fits."""
    _estimate_scaled(monkeypatch, "bf16 compute", 0.5)
    est16, comp16 = figures["bf16 compute"]
    est32, comp32 = figures["as configured"]
    _, comp_abn = figures["+ in-place ABN"]
    budget = (comp16 + comp_abn) // 2
    assert est16 // 2 <= budget < comp16 and budget < min(est32, comp32) and comp_abn <= budget
    assert planner.plan(budget, 1, SHAPE, model_cfg=TINY).technique == "bf16 compute"
    p = planner.plan(budget, 1, SHAPE, model_cfg=TINY, compile="here")
    assert p.technique == "+ in-place ABN" and p.model.norm == "inplace_abn"
    assert p.total == comp_abn and p.checked[0][3] == comp16 > budget


def test_planner_takes_any_shape_per_axis():
    for shape, n in [((16, 8, 8), 2), ((24, 16, 8), 4), ((8, 40, 16), 8)]:
        p = planner.plan(2 ** 30, n, shape, model_cfg=TINY)
        d, *split = p.mesh
        assert d * split[0] * split[1] * split[2] == n
        assert p.estimate["local_shape"][1:-1] == tuple(s // k for s, k in zip(shape, split))
        assert p.shape == shape


def test_compile_here_with_too_few_devices_is_one_line():
    need = jax.device_count() * 2
    with pytest.raises(confirm.CannotCompile) as e:
        confirm.compile_step(TINY, SHAPE, (1, need, 1, 1), where="here")
    assert f"needs {need} devices" in str(e.value) and "\n" not in str(e.value)
    assert confirm.FLAG in str(e.value)


def test_cli_prints_both_figures_and_which_it_used(capsys):
    """Two devices from a one-device process: the compile runs in a subprocess."""
    argv = ["memory", "--resolution", *map(str, SHAPE), "--devices", "2", "--preset", "tiny",
            "--budget", "64MiB"]
    assert cli.main(argv + ["--compile"]) == 0      # --compile alone: auto
    out = capsys.readouterr().out
    assert "compiled in a subprocess on fake CPU devices" in out
    assert "the figure used; analytic estimate" in out
    assert "Compiled (XLA memory_analysis per device" in out
    for default in ([], ["--compile", "no"]):     # by default the estimate answers alone
        assert cli.main(argv + default) == 0
        out = capsys.readouterr().out
        assert "analytic estimate" in out and "not compiled" in out and "Compiled (" not in out
    if jax.device_count() < 2:
        assert cli.main(argv + ["--compile", "here"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hrseg memory: error: compiling the 1×2×1×1 mesh needs 2 "
                              "devices") and len(err.splitlines()) == 1



@pytest.mark.parametrize("factor", [0.4, 2.5])
def test_suggestion_walks_the_device_counts_by_the_compiled_figure(monkeypatch, factor):
    """Nothing fits on 1 device: the fewest devices is confirmed by compiling, walking down from
    the estimate's suggestion (the compile says less) or up (it says more). The compile is
    replaced by a multiple of the estimate so that both directions can be built."""
    def fake(cfg, shape, mesh, batch=1, optimizer="adafactor", in_channels=1, where="auto"):
        est = memory.estimate(cfg, shape, mesh, optimizer=optimizer, batch=batch)["total"]
        return {"total": int(factor * est), "argument": 0, "temp": 0, "where": "here"}

    monkeypatch.setattr(confirm, "compile_step", fake)
    shape = (64, 64, 64)
    last = planner._ladder(TINY)[-1][1]

    def compiled_best(n):  # the most intrusive technique's smallest compiled figure on n
        return min(fake(last, shape, (1,) + s)["total"]
                   for s in planner.spatial_splits(n, shape, unet.poolings_of(TINY)))

    budget = memory.estimate(last, shape, (1, 2, 2, 2), batch=1)["total"]
    a = planner.plan(budget, 1, shape, model_cfg=TINY)
    assert a.mesh is None and a.suggestion.n_devices == 8
    p = planner.plan(budget, 1, shape, model_cfg=TINY, compile="here")
    want = next(n for n in (2, 4, 8, 16, 32, 64) if compiled_best(n) <= budget)
    assert p.mesh is None and p.suggestion.n_devices == want
    assert (want < 8) if factor < 1 else (want > 8)
    assert p.suggestion.used == "compiled" and p.suggestion.total <= budget
    assert f"It would fit on {want} devices" in p.explain()
