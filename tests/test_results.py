"""results.py: runs/ -> the paper-style table, with hand-computed means and deviations."""
import csv
import dataclasses
import json
import math

import pytest

from hrseg import config
from hrseg.nn import unet
from hrseg.workbench import results, verdict


def make_run(root, name, resolution, evals, seed=0, dims=3, step_times=()):
    """A run directory as train.train leaves it: config.yaml + checkpoints/eval_<step>.json."""
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    cfg = config.Config()
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, resolution=tuple(resolution)),
        model=dataclasses.replace(unet.preset("tiny"), dims=dims),
        train=dataclasses.replace(cfg.train, name=name, seed=seed))
    config.dump(cfg, d / "config.yaml")
    for step, (tumour, liver) in evals.items():
        metrics = {"tumour_dice_per_case": tumour, "tumour_dice_global": tumour + 0.1,
                   "liver_dice_per_case": liver, "liver_dice_global": liver, "cases": 2}
        (d / "checkpoints" / f"eval_{step:08d}.json").write_text(
            json.dumps({"step": step, "metrics": metrics}))
    if step_times:   # the first step of an invocation compiles: the median ignores it
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "loss": 1.0, "step_time_s": t}) + "\n"
            for i, t in enumerate(step_times)) + json.dumps({"step": 3, "eval": {}}) + "\n")
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # 64³: two seeds; the last 2 evaluations of each count -> tumour 0.5, 0.7, 0.6, 0.8
    make_run(root, "r64_s0", (64, 64, 64), {10: (0.0, 0.1), 20: (0.5, 0.9), 30: (0.7, 0.9)},
             step_times=[30.0, 2.0, 2.0])
    make_run(root, "r64_s1", (64, 64, 64), {20: (0.6, 0.8), 30: (0.8, 1.0)}, seed=1,
             step_times=[30.0, 4.0, 4.0])
    # 32³: one run, one evaluation -> no ± ; a NaN (no tumour anywhere) is left out
    make_run(root, "r32", (32, 32, 32), {5: (0.25, 0.5)})
    make_run(root, "r32_nan", (32, 32, 32), {5: (math.nan, 0.7)})
    # a 2D run sorts after every 3D row; a run with no evaluation is no row
    make_run(root, "r2d", (64, 64), {5: (0.4, 0.6)}, dims=2)
    make_run(root, "unfinished", (128, 128, 128), {})
    make_run(root / "study", "nested", (64, 64, 64), {5: (0.0, 0.0)})   # not directly under root
    (root / "02_halo_correctness").mkdir()   # notebook figure folders are not runs
    return root


def test_runs_of_one_resolution_with_different_recipes_are_separate_rows(runs):
    d = make_run(runs, "r64_adam", (64, 64, 64), {5: (0.1, 0.2)})
    cfg = config.load(d / "config.yaml")
    config.dump(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adam")),
                d / "config.yaml")
    labels = [r["resolution"] for r in results.collect(runs, last=2, memory=False)]
    assert labels == ["32³", "64³ (r64_adam)", "64³ (r64_s0)", "64² 2D"]


def test_a_patch_run_is_its_own_row_with_the_patch_throughput(runs):
    d = make_run(runs, "p64", (64, 64, 64), {5: (0.1, 0.2)}, step_times=(9.0, 2.0, 2.0))
    cfg = config.load(d / "config.yaml")
    config.dump(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, patch=(32, 32, 16))),
                d / "config.yaml")
    rows = {r["resolution"]: r for r in results.collect(runs, last=2)}
    assert list(rows) == ["32³", "64³, 32×32×16 patches", "64³", "64² 2D"]   # then by name
    patch = rows["64³, 32×32×16 patches"]
    assert patch["voxels_per_s"] == pytest.approx(32 * 32 * 16 / 2.0)   # median step 2 s
    assert patch["memory_bytes"] < rows["64³"]["memory_bytes"] / 2      # a step on 1/8 voxels


def test_collect_groups_by_resolution_and_averages_last_checkpoints(runs):
    rows = results.collect(runs, last=2, memory=False)
    assert [r["resolution"] for r in rows] == ["32³", "64³", "64² 2D"]
    r64 = rows[1]
    assert r64["runs"] == ["r64_s0", "r64_s1"] and r64["n"] == 4
    # tumour per case: mean(0.5, 0.7, 0.6, 0.8) = 0.65; sample std = sqrt(0.05 / 3) = 0.1291
    assert r64["tumour_dice_per_case"] == pytest.approx(0.65)
    assert r64["tumour_dice_per_case_std"] == pytest.approx(math.sqrt(0.05 / 3))
    assert r64["tumour_dice_global"] == pytest.approx(0.75)
    # liver per case: mean(0.9, 0.9, 0.8, 1.0) = 0.9; std = sqrt(0.02 / 3)
    assert r64["liver_dice_per_case_std"] == pytest.approx(math.sqrt(0.02 / 3))
    assert r64["step_time_s"] == pytest.approx(3.0)
    assert r64["voxels_per_s"] == pytest.approx(config.Config().train.batch * 64 ** 3 / 3.0)
    r32 = rows[0]
    assert r32["tumour_dice_per_case"] == pytest.approx(0.25)     # NaN left out ...
    assert r32["tumour_dice_per_case_n"] == 1                      # ... and not counted
    assert r32["liver_dice_per_case"] == pytest.approx(0.6)       # (0.5 + 0.7) / 2
    assert math.isnan(r32["step_time_s"])                          # no metrics.jsonl


def test_display_table_and_files(runs, tmp_path):
    rows = results.collect(runs, last=2, memory=False)
    shown = results.table(rows)
    assert shown[1]["Tumour Dice per case"] == "0.650 ± 0.129"
    assert shown[0]["Tumour Dice per case"] == "0.250"              # one value: no ±
    assert shown[1]["Runs × ckpts"] == "2 × 2"
    assert shown[0]["Memory / device"] == "–"
    paths = results.write_table(rows, tmp_path / "out", title="test")
    md = paths["md"].read_text()
    assert "| 64³ | 0.650 ± 0.129 | 0.750 ± 0.129 |" in md
    rows_csv = list(csv.DictReader(paths["csv"].open()))
    assert list(rows_csv[0])[:4] == ["resolution", "runs", "n", "tumour_dice_per_case"]
    assert rows_csv[1]["runs"] == "r64_s0 r64_s1" and rows_csv[1]["n"] == "4"
    assert float(rows_csv[1]["tumour_dice_per_case"]) == pytest.approx(0.65)
    assert paths["png"].stat().st_size > 5_000


def test_memory_column_is_the_analytic_estimate(runs):
    from hrseg import memory
    rows = results.collect(runs, last=1)
    cfg = config.load(runs / "r64_s0" / "config.yaml")
    want = memory.estimate(cfg.model, (64, 64, 64), batch=1, optimizer="adafactor")["total"]
    assert rows[1]["memory_bytes"] == pytest.approx(want)
    assert rows[0]["memory_bytes"] < rows[1]["memory_bytes"]         # 32³ < 64³


def test_figures_render(runs):
    rows = results.collect(runs, last=2, memory=True)
    assert len(results.dice_figure(rows).axes) == 2
    ref = [{"resolution": "128³", "voxels": 128 ** 3, "memory_bytes": 2 ** 31, "label": "paper"}]
    assert results.memory_figure(rows, ref).axes[0].get_yscale() == "log"


def test_no_runs_gives_an_empty_table(tmp_path):
    assert results.collect(tmp_path, memory=False) == []
    with pytest.raises(ValueError, match="last must be >= 1"):
        results.collect(tmp_path, last=0)


def test_markdown_table_formats_nan_and_floats():
    md = results.markdown_table([{"a": 1.23456, "b": math.nan, "c": "x"}], floatfmt=".2f")
    assert md.splitlines()[2] == "| 1.23 | – | x |"


def test_cli_table_writes_the_files_and_refuses_an_empty_folder(runs, tmp_path, capsys):
    from hrseg import cli
    assert cli.main(["table", str(runs), "--last", "2", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "| 64³ | 0.650 ± 0.129 | 0.750 ± 0.129 |" in out
    assert (tmp_path / "t" / "results.csv").is_file()
    (tmp_path / "empty").mkdir()
    assert cli.main(["table", str(tmp_path / "empty")]) == 2
    assert "no run with an evaluation under" in capsys.readouterr().err


def _set_tumour_cases(run_dir, n):
    for p in (run_dir / "checkpoints").glob("eval_*.json"):
        rec = json.loads(p.read_text())
        rec["metrics"]["cases_with_tumour"] = n
        p.write_text(json.dumps(rec))


def test_no_validation_tumour_shows_n_a_not_zero(runs, tmp_path):
    for name in ("r32", "r32_nan"):
        _set_tumour_cases(runs / name, 0)
    _set_tumour_cases(runs / "r64_s0", 2)
    rows = results.collect(runs, last=2, memory=False)
    assert [r["val_tumour_cases"] for r in rows] == [0, 2, -1]    # -1: older logs, unknown
    shown = results.table(rows)
    assert shown[0]["Tumour Dice per case"] == shown[0]["Tumour Dice global"] == "n/a"
    assert shown[0]["Liver Dice global"] == "0.600 ± 0.141"
    assert shown[1]["Tumour Dice global"] == "0.750 ± 0.129"
    md = results.write_table(rows, tmp_path / "out")["md"].read_text()
    assert "| 32³ | n/a | n/a |" in md
    assert "cannot be compared across resolutions (no validation tumour)" in md


def _row(label, tumour, liver=0.9, glob=None):
    """A table row: tumour Dice per case ``tumour`` (global ``glob``, default the same)."""
    return {"resolution": label, "tumour_dice_per_case": tumour,
            "tumour_dice_global": tumour if glob is None else glob,
            "liver_dice_global": liver, "val_tumour_cases": 3}


def test_summary_reads_the_trend_on_dice_per_case_as_table_1_does():
    # per case rises steadily (as in Table 1), global does not (as in Table 1): the verdict
    # follows per case and reports global beside it with Table 1's own rows
    rising = [_row("16³", 0.1, glob=0.5), _row("32³", 0.3, glob=0.7),
              _row("64³", 0.5, 0.88, glob=0.6), _row("64² 2D", 0.05)]
    s = results.summary(rising)
    assert s.startswith("Tumour Dice per case rises with the input resolution, as in Hou et "
                        "al.'s Table 1: 0.100 (16³) → 0.300 (32³) → 0.500 (64³)"), s
    assert "tumour Dice global beside it 0.500 → 0.700 → 0.600" in s
    assert "0.5364 → 0.6494 → 0.5783 → 0.7180, not steadily" in s
    assert "(64² 2D)" not in s      # the 2D row is not a point of the 3D trend
    assert "liver Dice global 0.880 at 64³. In 3D at 64³ tumour Dice per case is 0.500, in 2D " \
        "at 64² 0.050: 3D beats 2D (in Hou et al.'s Table 1, 3D beats 2D 512² × 5 " \
        "(0.4072) at 256³, 512³ only)." in s, s
    flat = results.summary([_row("32³", 0.3), _row("64³", 0.2), _row("64² 2D", 0.25)])
    assert "In 3D at 64³ tumour Dice per case is 0.200, in 2D at 64² 0.250: 2D beats 3D" in flat
    assert "2D" not in results.summary([_row("32³", 0.3), _row("64³", 0.5)])
    assert "does not rise steadily with the input resolution, against Hou" in results.summary(
        [_row("16³", 0.1), _row("32³", 0.3), _row("64³", 0.2)])
    assert "falls with" in results.summary([_row("32³", 0.3), _row("64³", 0.2)])
    assert "fewer than two resolutions" in results.summary([_row("32³", math.nan), _row("64³", 0.2)])
    assert results.summary([_row("64³", 0.2)]) == "Liver Dice global 0.900 at 64³."
    assert results.summary([]).startswith("No training run")
    g = results.summary(rising, metric="tumour_dice_global")
    assert "Tumour Dice global does not rise steadily with the input resolution, as in Hou" in g


def test_table_1_values_stand_beside_the_rows_they_match():
    assert verdict.table1("128³") == (0.3589, 0.6494)
    assert verdict.table1("512² × 5, 2D") == (0.4072, 0.6432)
    assert verdict.table1("64³ (train_64_s0)") == (0.2513, 0.5364)
    assert verdict.table1("32³") is None
    assert verdict.table1("64² 2D (train_2d_s0)") == (0.4072, 0.6432)   # Table 1's one 2D row
    assert "256³ 0.4359 / 0.5783" in verdict.table1_line()


def test_summary_compares_whole_volume_with_patches_not_as_a_resolution():
    rows = [_row("64³, 32³ patches", 0.477, 0.883), _row("64³", 0.543, 0.901)]
    s = results.summary(rows)
    assert "rises with" not in s and "across resolutions" not in s
    assert s == ("Liver Dice global 0.901 at 64³. At 64³, tumour Dice per case 0.543 (whole "
                 "volume) vs 0.477 (32³ patches): the whole volume beats patches, as in Wang "
                 "et al.'s Fig. 4b.")
    flipped = [_row("64³, 32³ patches", 0.6), _row("64³", 0.5)]
    assert "patches beat the whole volume" in results.summary(flipped)
    both = [_row("32³", 0.3), _row("64³, 32³ patches", 0.4), _row("64³", 0.5, 0.88)]
    s = results.summary(both)
    assert s.startswith("Tumour Dice per case rises with the input resolution, as in Hou et "
                        "al.'s Table 1: 0.300 (32³) → 0.500 (64³); tumour Dice global beside "
                        "it 0.300 → 0.500")
    assert "0.500 (whole volume) vs 0.400 (32³ patches)" in s
