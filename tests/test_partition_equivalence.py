"""benchmarks/partition_equivalence.py on two hand-made run folders: it compares only runs of
one recipe, and reports the loss and Dice differences it reads (issue 32's 128³ check)."""
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import partition_equivalence as pe

DICE = {"tumour_dice_per_case": 0.3, "tumour_dice_global": 0.5, "liver_dice_per_case": 0.9,
        "liver_dice_global": 0.9}


def _run(path: Path, spatial, losses, evals, lr=0.01) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(
        {"train": {"name": path.name, "lr": lr, "seed": 0}, "mesh": {"spatial": spatial}}))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": v, "step_time_s": 1.0 + i}) + "\n"
        for i, v in enumerate(losses)) + json.dumps({"step": 2, "eval": True}) + "\n")
    for step, d in evals.items():
        (path / "checkpoints" / f"eval_{step:08d}.json").write_text(
            json.dumps({"step": step, "metrics": d}))
    return path


def test_reports_the_loss_and_dice_differences(tmp_path):
    a = _run(tmp_path / "a", [1, 1, 1], [1.0, 0.8, 0.5], {2: DICE})
    b = _run(tmp_path / "b", [2, 2, 2], [1.0, 0.8 * (1 + 1e-6), 0.6],
             {2: {**DICE, "liver_dice_global": 0.88}})
    r = pe.compare(a, b)
    assert r["steps_compared"] == [1, 3] and r["loss_first_step_rel_diff"] == 0
    assert r["loss_max_abs_diff"] == pytest.approx(0.1)
    assert r["loss_max_rel_diff"] == pytest.approx(0.2)
    [e] = r["evaluations"]
    assert e["step"] == 2 and e["max_abs_dice_diff"] == pytest.approx(0.02)
    assert r["step_time_s"] == {"one_device": 2.5, "partitioned": 2.5}   # steps 2-3 of both


def test_refuses_runs_of_different_recipes(tmp_path):
    a = _run(tmp_path / "a", [1, 1, 1], [1.0], {})
    b = _run(tmp_path / "b", [2, 2, 2], [1.0], {}, lr=0.003)
    with pytest.raises(SystemExit, match="differ in train.lr"):
        pe.compare(a, b)
