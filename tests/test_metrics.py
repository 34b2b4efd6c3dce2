"""Dice per case / global, hand-computed, the empty-mask conventions, medpy cross-check."""
import math

import numpy as np
import pytest

from hrseg import metrics


def vol(*values):
    return np.array(values, np.int32).reshape(1, 1, -1)


def test_hand_computed_tumour_dice():
    pred = vol(0, 2, 2, 2, 1, 0)
    true = vol(0, 2, 2, 0, 2, 0)
    # |P∩T| = 2, |P| = 3, |T| = 3 -> 2*2 / (3+3) = 0.6667
    assert metrics.dice(pred, true, 2) == pytest.approx(4 / 6)
    # liver region = label >= 1: P = {1,2,3,4}, T = {1,2,4} -> 2*3 / (4+3) = 0.8571
    assert metrics.dice(pred, true, 1) == pytest.approx(6 / 7)


def test_per_case_versus_global():
    preds = [vol(2, 2, 0, 0), vol(2, 0, 0, 0)]
    trues = [vol(2, 2, 2, 2), vol(0, 0, 0, 0)]
    # case 1: 2*2/(2+4) = 0.6667; case 2: 2*0/(1+0) = 0 -> per case (0.6667 + 0) / 2 = 0.3333
    assert metrics.dice_per_case(preds, trues) == pytest.approx(1 / 3)
    # global: 2*2 / (3 + 4) = 0.5714
    assert metrics.dice_global(preds, trues) == pytest.approx(4 / 7)


def test_empty_mask_conventions():
    preds = [vol(2, 2, 0), vol(0, 1, 0)]
    trues = [vol(2, 0, 0), vol(0, 1, 0)]          # case 2: no tumour anywhere
    # case 1: 2*1/(2+1) = 0.6667; case 2 both empty: 1.0 -> mean 0.8333
    assert metrics.dice_per_case(preds, trues) == pytest.approx((2 / 3 + 1) / 2)
    # Mesh-TF counted such a case as 0 -> 0.3333
    assert metrics.dice_per_case(preds, trues, empty=0.0) == pytest.approx(1 / 3)
    # or leave it out -> 0.6667
    assert metrics.dice_per_case(preds, trues, empty=None) == pytest.approx(2 / 3)
    assert metrics.dice_global([vol(0, 1)], [vol(1, 0)]) == 1.0   # no tumour at all
    assert math.isnan(metrics.dice_per_case([vol(0)], [vol(0)], empty=None))


@pytest.mark.parametrize("empty,per_case", [(1.0, (2 / 3 + 1) / 2), (0.0, 1 / 3),
                                            (None, 2 / 3)])
def test_evaluation_records_its_empty_mask_convention(empty, per_case):
    """Today's 1.0, Hou et al.'s released code's 0.0, or left out: the result says which."""
    preds = [vol(2, 2, 0), vol(0, 1, 0)]
    trues = [vol(2, 0, 0), vol(0, 1, 0)]
    r = metrics.evaluate_cases(preds, trues, empty=empty)
    assert r["empty_dice"] == empty
    assert r["tumour_dice_per_case"] == pytest.approx(per_case)
    assert r["per_case"][1]["tumour"] == empty


def test_matches_medpy_on_non_empty_masks():
    from medpy.metric.binary import dc
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.integers(0, 3, (9, 8, 7))
        t = rng.integers(0, 3, (9, 8, 7))
        for label in (1, 2):
            want = dc(metrics.region(p, label), metrics.region(t, label))
            assert metrics.dice(p, t, label) == pytest.approx(want, abs=1e-12)


def test_evaluate_cases_and_mean_std():
    preds = [vol(0, 2, 1, 1), vol(1, 1, 0, 0)]
    trues = [vol(0, 2, 2, 1), vol(1, 0, 0, 0)]
    r = metrics.evaluate_cases(preds, trues)
    # tumour: case 1 2*1/(1+2) = 0.6667, case 2 both empty = 1 -> 0.8333; global 2/3
    assert r["tumour_dice_per_case"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["tumour_dice_global"] == pytest.approx(2 / 3)
    # liver (>= 1): case 1 P={1,2,3} T={1,2,3} -> 1; case 2 P={0,1} T={0} -> 2/3; global 2*4/(5+4)
    assert r["liver_dice_per_case"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["liver_dice_global"] == pytest.approx(8 / 9)
    assert r["cases"] == 2 and r["cases_with_tumour"] == 1
    assert r["per_case"][1] == {"tumour": 1.0, "liver": pytest.approx(2 / 3)}
    # three models: mean 0.5, sample sd sqrt(((0.4-0.5)^2 + 0 + (0.6-0.5)^2) / 2) = 0.1
    m, s, n = metrics.mean_std([0.4, 0.5, 0.6])
    assert (m, s, n) == (pytest.approx(0.5), pytest.approx(0.1), 3)
    assert metrics.mean_std([0.7, None, math.nan]) == (0.7, 0.0, 1)   # finite values only
    assert all(math.isnan(x) for x in metrics.mean_std([None])[:2])


def test_region_dice_from_counts():
    # rows in REGIONS order: (intersection, predicted, true) voxels
    d = metrics.region_dice([[30, 40, 50], [0, 0, 0]])
    assert d["liver"] == pytest.approx(60 / 90)       # 2·30 / (40 + 50)
    assert math.isnan(d["tumour"])                    # neither predicted nor present


def test_training_step_counts_score_like_the_evaluation():
    """The train step's on-device counts give the evaluation's Dice: liver with its tumours."""
    import jax.numpy as jnp

    from hrseg.train import step
    preds = [vol(0, 2, 1, 1), vol(1, 1, 0, 2)]
    trues = [vol(0, 2, 2, 1), vol(1, 0, 2, 2)]
    c = step.count_overlap(jnp.asarray(np.stack(preds)), jnp.asarray(np.stack(trues)))
    assert c.dtype == jnp.int32 and c.shape == (len(metrics.REGIONS), 3)
    d = metrics.region_dice(c)
    r = metrics.evaluate_cases(preds, trues)
    assert d["liver"] == pytest.approx(r["liver_dice_global"])
    assert d["tumour"] == pytest.approx(r["tumour_dice_global"])
    # liver: P = {1,2,3} ∪ {0,1,3}, T = {1,2,3} ∪ {0,2,3} -> 2·(3 + 2) / (6 + 6); a
    # tumour-free liver class would score case 1's voxel 2 (tumour) as a miss
    assert d["liver"] == pytest.approx(10 / 12)


def test_shape_and_length_errors():
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(vol(1, 2), vol(1, 2, 0))
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metrics.dice_global([vol(1), vol(2)], [vol(1)])


def test_shown_says_n_a_where_a_score_measures_nothing():
    from hrseg.metrics import NOT_APPLICABLE, shown, tumour_applicable
    assert NOT_APPLICABLE == "n/a"
    assert shown(0.71234) == "0.712" and shown(0.5, digits=2) == "0.50"
    assert shown(0.0, applicable=False) == shown(math.nan) == shown(None) == "n/a"
    assert tumour_applicable({"cases_with_tumour": 2})
    assert not tumour_applicable({"cases_with_tumour": 0})
    assert tumour_applicable({})                            # older logs: not known, shown


def test_evaluate_and_train_lines_say_n_a_like_the_table():
    """`hrseg train` / `evaluate` print inference.summary_line; `hrseg table` results.table."""
    from hrseg.train.inference import summary_line
    from hrseg.workbench import results
    no_tumour = {"tumour_dice_per_case": 1.0, "tumour_dice_global": 0.0, "liver_dice_per_case":
                 0.8, "liver_dice_global": 0.9, "cases": 2, "cases_with_tumour": 0}
    line = summary_line(no_tumour)
    assert line == ("tumour_dice_per_case n/a, tumour_dice_global n/a, "
                    "liver_dice_per_case 0.800, liver_dice_global 0.900")
    assert "tumour_dice_global 0.250" in summary_line(
        dict(no_tumour, cases_with_tumour=1, tumour_dice_global=0.25))
    assert "tumour_dice_global n/a" in summary_line(
        dict(no_tumour, cases_with_tumour=1, tumour_dice_global=math.nan))
    row = {"resolution": "16³", "runs": ["a"], "n": 1, "val_tumour_cases": 0,
           **{f"{m}{s}": v for m in results.METRICS for s, v in (("", 0.0), ("_std", 0.0),
                                                                   ("_n", 1))}}
    assert results.table([row])[0]["Tumour Dice global"] == "n/a"
