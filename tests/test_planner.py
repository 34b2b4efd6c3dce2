"""`hrseg memory` as a new user meets it: units, impossible device counts, what would fit,
the YAML that applies a plan, and how far the estimate is from the compiled figure."""
import yaml

from hrseg import cli, config
from hrseg.memory import planner


def test_budget_without_a_unit_is_refused(capsys):
    assert cli.main(["memory", "--resolution", "64", "--devices", "1", "--budget", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrseg memory: error: --budget 16: give a unit, e.g. 16GiB")
    assert len(err.strip().splitlines()) == 1


def test_impossible_device_count_says_why_and_what_works():
    p = planner.plan(16 * 2 ** 30, 6, 512)
    text = p.explain()
    assert p.mesh is None
    assert "6 devices cannot split a 512×512×512 volume" in text
    assert "the factor 3" in text and "nearest device counts that work: 4 or 8" in text


def test_nothing_fits_names_the_devices_and_mesh_that_would():
    p = planner.plan(16 * 2 ** 30, 8, 512)
    assert p.mesh is None and p.suggestion is not None
    s = p.suggestion
    assert s.n_devices == 16 and s.estimate["total"] <= 16 * 2 ** 30
    d, sx, sy, sz = s.mesh
    assert d * sx * sy * sz == 16
    assert f"It would fit on 16 devices: {d} (data) × {sx}×{sy}×{sz}" in p.explain()


def test_plan_prints_yaml_that_loads_as_the_plan_and_the_estimate_caveat(tmp_path):
    p = planner.plan(16 * 10 ** 9, 8, 256)
    text = p.explain()
    assert "upper bound" in text and planner.ESTIMATE_OVER_COMPILED in text
    f = tmp_path / "run.yaml"
    f.write_text("\n".join(p.yaml_lines()) + "\n")
    cfg = config.load(f)
    assert (cfg.mesh.data, *cfg.mesh.spatial) == p.mesh
    assert (cfg.model.block, cfg.model.norm, cfg.model.precision) == (
        p.model.block, p.model.norm, p.model.precision)
    assert yaml.safe_load("\n".join(line[4:] for line in text.splitlines()
                                    if line.startswith("    ")))["mesh"]["spatial"] == list(
        p.mesh[1:])
