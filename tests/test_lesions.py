"""hrseg.lesions (hand-computed cases, the phantom's known tumours), the original-grid scorer of
an evaluation (inference.LesionScorer), the per-lesion JSON of ``hrseg evaluate`` on a smoke
run, and ``hrseg table --lesions`` (hrseg.workbench.lesion_table)."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from hrseg import cli, config, data, lesions, train
from hrseg.data import nifti, phantom
from hrseg.nn import unet
from hrseg.train import inference
from hrseg.train.inference import LesionScorer
from hrseg.workbench import lesion_table

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "train" / "smoke" / "train_smoke.yaml"


# --- components and sizes ------------------------------------------------------------------

def test_voxels_touching_by_a_corner_are_one_lesion():
    m = np.zeros((4, 4, 4), bool)
    m[1, 1, 1] = m[2, 2, 2] = True                 # share a corner only
    m[0, 3, 3] = True                              # apart: its own lesion
    lab, n = lesions.components(m)
    assert n == 2 and lab[1, 1, 1] == lab[2, 2, 2] != lab[0, 3, 3]
    assert ndimage.label(m)[1] == 3                # 6-connectivity would split them
    with pytest.raises(ValueError, match="3D"):
        lesions.components(np.zeros((4, 4), bool))


def test_equivalent_diameter_and_bbox():
    # a sphere of diameter 10 mm has volume π/6 · 1000
    assert lesions.equivalent_diameter(math.pi / 6 * 1000) == pytest.approx(10.0)
    m = np.zeros((5, 6, 7), bool)
    m[1, 2, 3] = m[3, 4, 3] = True
    lo, hi = lesions.bbox(m)
    assert lo.tolist() == [1, 2, 3] and hi.tolist() == [4, 5, 4]
    assert lesions.bbox(np.zeros((2, 2, 2), bool)) is None


def _case():
    """Reference: A = 2×2×2 cube (8 voxels), B = one voxel, C = a 3-voxel row, D and E two
    single voxels bridged by one predicted blob. Prediction: 4 voxels of A plus 2 next to it
    (one blob of 6), 1 voxel of C, the D–E bridge (D, E and the voxel between), a 2-voxel
    false positive and a single false-positive voxel touching B only by a face."""
    t = np.zeros((12, 12, 12), bool)
    p = np.zeros_like(t)
    t[0:2, 0:2, 0:2] = True                        # A
    t[6, 6, 6] = True                              # B
    t[0, 8:11, 0] = True                           # C
    t[10, 0, 4] = t[10, 0, 6] = True               # D, E (apart: 2 voxels)
    p[0:2, 0:2, 0] = True                          # 4 voxels of A ...
    p[2, 0, 0] = p[3, 0, 0] = True                 # ... and 2 outside it: one blob of 6
    p[0, 9, 0] = True                              # 1 of C's 3
    p[10, 0, 4:7] = True                           # D, the gap, E: one blob of 3
    p[6, 0, 11] = p[7, 0, 11] = True               # false positive (2 voxels)
    p[6, 6, 7] = True                              # next to B, not on it: false positive
    return p, t


def test_per_lesion_dice_detection_and_false_positives_by_hand():
    p, t = _case()
    spacing = (0.5, 1.0, 2.0)                      # 1 mm³ voxels
    out = lesions.analyse(p, t, spacing)
    les = out["lesions"]
    assert [x["voxels"] for x in les] == [8, 3, 1, 1, 1]      # scan order: A, C, B, D, E
    a, c, b, d, e = les
    assert a["volume_mm3"] == 8.0
    assert a["diameter_mm"] == pytest.approx((6 * 8 / math.pi) ** (1 / 3), abs=1e-3)
    assert a["centre_voxel"] == [0.5, 0.5, 0.5]
    assert a["overlap_voxels"] == 4 and a["dice"] == pytest.approx(2 * 4 / (6 + 8))
    assert c["dice"] == pytest.approx(2 * 1 / (1 + 3))
    assert b["overlap_voxels"] == 0 and b["dice"] == 0.0
    # D's prediction is the bridge less E's voxel: 2 voxels, 1 on D -> 2/(2+1)
    assert d["dice"] == pytest.approx(2 / 3) and e["dice"] == pytest.approx(2 / 3)
    # default rule: any overlap
    assert [x["detected"] for x in les] == [True, True, False, True, True]
    assert out["false_positives"] == 2 and out["predicted_lesions"] == 5
    strict = lesions.analyse(p, t, spacing, rule="dice")          # Dice >= 0.5
    assert [x["detected"] for x in strict["lesions"]] == [True, True, False, True, True]
    stricter = lesions.analyse(p, t, spacing, rule="dice", threshold=0.6)
    assert [x["detected"] for x in stricter["lesions"]] == [False, False, False, True, True]
    nothing = lesions.analyse(np.zeros_like(t), t, spacing)
    assert not any(x["detected"] for x in nothing["lesions"]) and nothing["false_positives"] == 0
    assert lesions.analyse(p, np.zeros_like(t), spacing)["false_positives"] == 5
    with pytest.raises(ValueError, match="rule 'iou'"):
        lesions.analyse(p, t, spacing, rule="iou")
    with pytest.raises(ValueError, match="differ"):
        lesions.analyse(p[:3], t, spacing)


def test_bins_edges_and_pooled_summary():
    assert lesions.bin_labels() == ["< 10 mm", "10–20 mm", "20–40 mm", "≥ 40 mm"]
    assert [lesions.bin_of(d) for d in (0.5, 9.99, 10.0, 19.9, 20.0, 39.9, 40.0, 300)] == \
        [0, 0, 1, 1, 2, 2, 3, 3]

    def lesion(d, overlap, dice):
        return {"diameter_mm": d, "overlap_voxels": overlap, "dice": dice}

    cases = [{"lesions": [lesion(5, 0, 0.0), lesion(8, 3, 0.2), lesion(25, 40, 0.8)],
              "false_positives": 3},
             {"lesions": [lesion(9, 1, 0.6), lesion(45, 900, 0.9)], "false_positives": 0}]
    s = lesions.summarize(cases)
    small, mid, big, huge = s["bins"]
    assert (small["lesions"], small["detected"]) == (3, 2)
    assert small["detection_rate"] == pytest.approx(2 / 3)
    assert small["dice_mean"] == pytest.approx((0.0 + 0.2 + 0.6) / 3)
    assert mid["lesions"] == 0 and math.isnan(mid["detection_rate"])
    assert (big["detected"], huge["detected"]) == (1, 1)
    assert s["false_positives_per_case"] == 1.5 and s["reference_lesions"] == 5
    strict = lesions.summarize(cases, rule="dice")         # re-applied from the records
    assert strict["bins"][0]["detected"] == 1 and strict["rule"] == "dice"
    assert math.isnan(lesions.summarize([])["false_positives_per_case"])


def test_summary_line_says_how_many_lesions_were_found():
    cases = [{"lesions": [{"diameter_mm": 5, "overlap_voxels": 0, "dice": 0.0},
                          {"diameter_mm": 30, "overlap_voxels": 9, "dice": 0.7}],
              "false_positives": 3}]
    line = inference.summary_line({"tumour_dice_global": 0.5,
                                   "lesions": lesions.summarize(cases)})
    assert line == ("tumour_dice_global 0.500; lesions detected 1/2 (overlap), "
                    "3.0 false positive(s) per case")


# --- the phantom's known tumours ---------------------------------------------------------------

@pytest.mark.parametrize("index", [1, 3])
def test_lesions_of_the_phantom_match_its_drawn_tumours(index):
    """At the real size (512² × 80 / 148 slices): every drawn tumour's centre lies in a lesion;
    every lesion holds a drawn centre (none split, none invented); a lesion holding one tumour
    has the equivalent diameter of its ellipsoid within 8 % (the lobes and the voxels)."""
    seed = phantom.case_seed(0, index)
    _, label, affine = phantom.generate_case(seed)
    truth = phantom.case_tumours(seed)
    assert truth, "the test needs a case with tumours"
    mask = label == 2
    lo, hi = lesions.bbox(mask)
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    out = lesions.analyse(crop, crop, nifti.spacing_of(affine), origin=lo)
    comp, n = lesions.components(crop)
    assert n == len(out["lesions"])
    hit = []
    for t in truth:
        v = np.round(np.array(t["centre_voxel"]) - lo).astype(int)
        hit.append(int(comp[tuple(v)]))
    assert 0 not in hit                            # every centre is on a lesion
    assert sorted(set(hit)) == list(range(1, n + 1))   # every lesion is a drawn tumour
    alone = [(t, k) for t, k in zip(truth, hit) if hit.count(k) == 1]
    assert len(alone) >= 3
    for t, k in alone:
        got = out["lesions"][k - 1]
        assert got["diameter_mm"] == pytest.approx(t["diameter_mm"], rel=0.08), t
        assert np.abs(np.array(got["centre_voxel"]) - t["centre_voxel"]).max() < 3 + 0.2 * \
            t["radius_mm"] / nifti.spacing_of(affine).min()
    assert {round(d["diameter_mm"]) for d in out["lesions"]} & {5, 7, 8, 9, 11}   # < 12 mm ones
    assert all(d["detected"] and d["dice"] == 1.0 for d in out["lesions"])


def test_phantom_writes_its_tumours_beside_the_cases(tmp_path):
    phantom.write_dataset(tmp_path, cases=2, seed=4, shape=(40, 36, 20))
    truth = json.loads((tmp_path / phantom.TUMOURS).read_text())
    assert truth == json.loads(json.dumps(
        {str(i): phantom.case_tumours(phantom.case_seed(4, i), (40, 36, 20)) for i in (0, 1)}))
    (tmp_path / phantom.TUMOURS).unlink()          # a dataset written before the file existed
    phantom.write_dataset(tmp_path, cases=2, seed=4, shape=(40, 36, 20))
    assert json.loads((tmp_path / phantom.TUMOURS).read_text()) == truth


# --- on the original grid -----------------------------------------------------------------------

def _smoke(dataset, out, *overrides):
    return config.load(SMOKE, [f"data.root={dataset}", f"data.cache_dir={dataset}/cache",
                               f"train.out_dir={out}", *overrides])


@pytest.mark.parametrize("over", [["data.resolution=[16,16,16]"],
                                  ["data.resolution=[24,24,24]", "data.resample=spacing"],
                                  ["data.resolution=[16,16]", "model.dims=2"]])
def test_scorer_on_the_original_grid_equals_the_whole_volume_analysis(dataset, tmp_path, over):
    """The scorer resamples and labels only a box: the same lesions as resampling the whole
    prediction back (data.to_original_geometry, as ``hrseg predict``) and analysing it all."""
    cfg = _smoke(dataset, tmp_path, "data.n_val=3", *over)
    ds = data.load_dataset(cfg.data)
    rng = np.random.default_rng(0)
    preds = []
    for v in ds.val:   # the label, a few interior false-positive voxels (the box's corners)
        p = np.array(v.label)
        for _ in range(3):
            p[tuple(rng.integers(2, n - 2) for n in p.shape)] = 2
        preds.append(p)
    got = LesionScorer(ds.val)(preds)
    assert [c["id"] for c in got["per_case"]] == [v.id for v in ds.val]
    assert got["grid"] == "original" and got["rule"] == lesions.DEFAULT_RULE
    assert got["reference_lesions"] > 0 and got["false_positives"] > 0
    for v, p, case in zip(ds.val, preds, got["per_case"]):
        label, _, spacing = data.read_nifti(v.meta["label_path"])        # canonical
        back, stored_affine = data.to_original_geometry(p, v.meta)      # as stored
        back, _ = nifti.to_canonical(back, stored_affine)
        want = lesions.analyse(back == 2, label == 2, spacing)
        assert case["lesions"] == want["lesions"]
        assert case["false_positives"] == want["false_positives"]


@pytest.fixture(scope="module")
def smoke_run(dataset, tmp_path_factory):
    cfg = _smoke(dataset, tmp_path_factory.mktemp("runs"), "train.name=lesions")
    return cfg, train.train(cfg, progress=False)


def test_evaluate_writes_the_per_lesion_table(smoke_run, dataset):
    cfg, result = smoke_run
    step = cfg.train.steps
    loop_json = json.loads(next((result.run_dir / "checkpoints").glob(f"eval_*{step}.json"))
                           .read_text())
    assert loop_json["metrics"]["lesions"]["per_case"]          # the loop writes it too
    path = result.run_dir / "checkpoints" / f"eval_{step:08d}.json"
    path.unlink()
    evaluated = train.evaluate(result.run_dir)
    line = inference.summary_line(evaluated)
    n = evaluated["lesions"]["reference_lesions"]
    assert line.startswith("tumour_dice_per_case") and (f"/{n} (overlap)" in line) == (n > 0)
    rec = json.loads(path.read_text())["metrics"]["lesions"]
    assert rec == json.loads(json.dumps(evaluated["lesions"]))
    assert [b["bin"] for b in rec["bins"]] == lesions.bin_labels()
    assert rec["rule"] == "overlap" and rec["bins_mm"] == [10.0, 20.0, 40.0]
    # the reference lesions are those of the stored label files, on their own grid
    ds = data.load_dataset(cfg.data)
    assert [c["id"] for c in rec["per_case"]] == [v.id for v in ds.val]
    for v, case in zip(ds.val, rec["per_case"]):
        label, _, spacing = data.read_nifti(v.meta["label_path"])
        _, n = lesions.components(label == 2)
        assert len(case["lesions"]) == n
        vox = sorted(x["voxels"] for x in case["lesions"])
        assert vox == sorted(np.bincount(lesions.components(label == 2)[0].ravel())[1:].tolist())
        assert all(x["volume_mm3"] == pytest.approx(x["voxels"] * np.prod(spacing), rel=1e-6)
                   for x in case["lesions"])
    assert rec["reference_lesions"] == sum(len(c["lesions"]) for c in rec["per_case"])
    assert sum(b["lesions"] for b in rec["bins"]) == rec["reference_lesions"]


# --- the table --------------------------------------------------------------------------------

def _run(root, name, resolution, records, dims=3):
    """A run directory with evaluations holding the given per-case lesion records."""
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    cfg = config.Config()
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, resolution=tuple(resolution)),
        model=dataclasses.replace(unet.preset("tiny"), dims=dims),
        train=dataclasses.replace(cfg.train, name=name))
    config.dump(cfg, d / "config.yaml")
    for step, per_case in records.items():
        m = {"tumour_dice_per_case": 0.5, "tumour_dice_global": 0.5, "liver_dice_per_case": 0.9,
             "liver_dice_global": 0.9, "cases": len(per_case or [1])}
        if per_case is not None:
            m["lesions"] = dict(lesions.summarize(per_case), per_case=per_case)
        (d / "checkpoints" / f"eval_{step:08d}.json").write_text(
            json.dumps({"step": step, "metrics": m}))


def _les(d, overlap, dice):
    return {"diameter_mm": d, "overlap_voxels": overlap, "dice": dice, "voxels": 1}


@pytest.fixture
def lesion_runs(tmp_path):
    root = tmp_path / "runs"
    small_missed = {"lesions": [_les(6, 0, 0.0), _les(30, 50, 0.7)], "false_positives": 1}
    small_found = {"lesions": [_les(6, 2, 0.4), _les(30, 60, 0.8)], "false_positives": 0}
    # 32³: the small lesion missed in both evaluations; an old evaluation without lesion data
    _run(root, "r32", (32, 32, 32), {10: None, 20: [small_missed], 30: [small_missed]})
    # 64³: found at step 30 only; the step-10 evaluation falls outside --last 2
    _run(root, "r64", (64, 64, 64), {10: [small_missed], 20: [small_missed],
                                     30: [small_found]})
    _run(root, "old", (16, 16, 16), {5: None})                 # no per-lesion data: no row
    return root


def test_lesion_table_pools_the_last_evaluations_per_resolution(lesion_runs):
    rows = lesion_table.collect(lesion_runs, last=2)
    assert [r["resolution"] for r in rows] == ["32³", "64³"]
    r32, r64 = rows
    assert r32["n"] == 2 and r32["bins"][0]["detected"] == 0 and r32["bins"][0]["lesions"] == 2
    assert r64["bins"][0]["detection_rate"] == 0.5
    assert r64["bins"][0]["dice_mean"] == pytest.approx(0.2)
    assert r64["false_positives_per_case"] == 0.5
    strict = lesion_table.collect(lesion_runs, last=2, rule="dice")
    assert strict[1]["bins"][0]["detected"] == 0                # Dice 0.4 < 0.5
    shown = lesion_table.table(rows)[1]
    assert shown["< 10 mm detected"] == "0.50 (1/2)" and shown["< 10 mm Dice"] == "0.200"
    assert shown["10–20 mm detected"] == "–" and shown["FP / case"] == "0.50"


def test_cli_table_lesions(lesion_runs, tmp_path, capsys):
    assert cli.main(["table", str(lesion_runs), "--lesions", "--last", "2",
                     "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "| 64³ | 2 | 4 | 0.50 (1/2) | 0.200 | – | – | 1.00 (2/2) | 0.750 | – | – | 0.50 |" in out
    assert "detected: any predicted voxel on the lesion (LiTS)" in out
    for name in ("lesions.md", "lesions.csv", "lesions.png"):
        assert (tmp_path / "t" / name).stat().st_size > 100
    assert cli.main(["table", str(lesion_runs), "--lesions", "--rule", "dice", "--last", "2",
                     "--out", str(tmp_path / "t")]) == 0
    assert "| 64³ | 2 | 4 | 0.00 (0/2) |" in capsys.readouterr().out
    (tmp_path / "bare").mkdir()
    assert cli.main(["table", str(tmp_path / "bare"), "--lesions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hrseg table: error: no run with a per-lesion")


def test_cli_table_lesions_of_a_smoke_run(smoke_run, capsys, tmp_path):
    _, result = smoke_run
    assert cli.main(["table", str(result.run_dir.parent), "--lesions",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Resolution | Evaluations | Lesions | < 10 mm detected |")
    assert "| 16³ | 1 |" in out
