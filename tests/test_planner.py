"""`hrseg memory` as a new user meets it: units, impossible device counts, what would fit,
the YAML that applies a plan, and how far the estimate is from the compiled figure."""
import pytest
import yaml

from hrseg import cli, config
from hrseg.memory import planner


def test_budget_without_a_unit_is_refused(capsys):
    assert cli.main(["memory", "--resolution", "64", "--devices", "1", "--budget", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrseg memory: error: --budget 16: give a unit, e.g. 16GiB")
    assert len(err.strip().splitlines()) == 1


def test_a_device_count_that_does_not_divide_is_planned_with_padded_shards():
    """6 devices on 512³: 512 does not split in 3, so that axis is padded in the step
    (parallel/uneven.py); the planner considers that mesh instead of refusing it."""
    p = planner.plan(16 * 2 ** 30, 6, 512)
    text = p.explain()
    assert "cannot split" not in text and "1×1×2×3" in text
    assert p.suggestion is not None and p.suggestion.n_devices > 6


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
    assert "not compiled" in text and planner.ESTIMATE_OVER_COMPILED in text
    assert "`hrseg memory --compile` confirms it" in text
    f = tmp_path / "run.yaml"
    f.write_text("\n".join(p.yaml_lines()) + "\n")
    cfg = config.load(f)
    assert (cfg.mesh.data, *cfg.mesh.spatial) == p.mesh
    assert (cfg.model.block, cfg.model.norm, cfg.model.precision) == (
        p.model.block, p.model.norm, p.model.precision)
    assert yaml.safe_load("\n".join(line[4:] for line in text.splitlines()
                                    if line.startswith("    ")))["mesh"]["spatial"] == list(
        p.mesh[1:])


def test_uneven_sizes_are_planned_on_their_padded_shards():
    """100 slices on 8 devices: no longer refused; the shard is the padded 128 / 8 = 16
    (2 poolings: 100 pools; the step pads to a multiple of 8 × 2²), and even splits come
    before padded ones."""
    from hrseg.memory import analytic
    assert analytic.local_shape((1, 100, 16, 16, 1), (1, 8, 1, 1), 3, 2) == (1, 16, 16, 16)
    with pytest.raises(ValueError, match="2\\^2"):
        analytic.local_shape((1, 98, 16, 16, 1), (1, 8, 1, 1), 3, 2)
    splits = planner.spatial_splits(8, (100, 64, 64), 2)
    assert splits[0] != (8, 1, 1) and (8, 1, 1) in splits
    padded = [s for s in splits if 100 % (s[0] * 4)]
    assert splits.index(padded[0]) > splits.index((1, 2, 4))


def test_the_stated_estimate_error_is_the_committed_grids():
    """What `hrseg memory` says of its estimate's error is the committed grid's lowest and
    highest error per precision (benchmarks/results/memory_grid.json)."""
    import json
    from pathlib import Path
    grid = json.loads((Path(__file__).parent.parent / "benchmarks" / "results" /
                       "memory_grid.json").read_text())["grid"]["points"]
    assert len(grid) >= 10
    for pol, (lo, hi) in planner.GRID_ERRORS.items():
        errors = [p[pol]["error"] for p in grid]
        assert (lo, hi) == (round(min(errors), 3), round(max(errors), 3)), pol
    assert "+1 % (bf16)" in planner.ESTIMATE_OVER_COMPILED
