"""KiTS19 (Wang et al.'s data): the layout, ``hrseg verify`` on it, ``data.preprocess: kits``
(clip + z-score, spacing, in-plane crop), ``hrseg phantom --task kits`` and the smoke run."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hrseg import cli, config, data
from hrseg.config import DataConfig
from hrseg.data import dataset, kits, kits_phantom, nifti, phantom

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "train" / "smoke" / "train_kits_smoke.yaml"
SHAPE = (48, 48, 24)
KITS = DataConfig(preprocess="kits", resample="native")


@pytest.fixture(scope="module")
def kits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits") / "data"
    assert cli.main(["phantom", "--task", "kits", "--cases", "3", "--shape", *map(str, SHAPE),
                     "--out", str(root)]) == 0
    return root


def _kits_case(root, name, image=None, label=None, affine=None, label_affine=None):
    d = root / name
    affine = np.diag([0.81, 0.81, 1.61, 1.0]) if affine is None else affine
    if image is not None:
        nifti.write_nifti(d / "imaging.nii.gz", image, affine, np.int16)
    if label is not None:
        nifti.write_nifti(d / "segmentation.nii.gz", label,
                          affine if label_affine is None else label_affine, np.uint8)
    return d


def test_phantom_writes_the_kits19_layout_and_verify_is_clean(kits_root, capsys):
    names = sorted(str(p.relative_to(kits_root)) for p in kits_root.rglob("*") if p.is_file())
    assert names == ["case_00000/imaging.nii.gz", "case_00000/segmentation.nii.gz",
                     "case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz",
                     "case_00002/imaging.nii.gz", "case_00002/segmentation.nii.gz",
                     "phantom.json"]
    assert json.loads((kits_root / "phantom.json").read_text())["task"] == "kits"
    assert nifti.detect_layout(kits_root) == "kits"
    assert [c.id for c in data.find_cases(kits_root)] == ["case_00000", "case_00001", "case_00002"]
    assert cli.main(["verify", str(kits_root)]) == 0
    assert capsys.readouterr().out.strip() == f"{kits_root}: OK"
    for case in data.find_cases(kits_root, "kits"):
        label, _, _ = data.read_nifti(case.label)
        assert set(np.unique(label).tolist()) == {0, 1, 2}, case.id      # every case: a tumour
    # Stored as KiTS19 stores it: slices on axis 0, a zero diagonal, every axis reversed; read
    # back canonical RAS (x, y, z), the same voxels generate_case drew.
    img = nib.load(kits_root / "case_00001" / "imaging.nii.gz")
    a = img.affine[:3, :3]
    assert a[0, 0] == a[2, 2] == 0 and a[0, 2] < 0 and a[1, 1] < 0 and a[2, 0] < 0
    assert img.shape == SHAPE[::-1]
    hu, label, affine = phantom.generate_case(phantom.case_seed(0, 1), SHAPE, task="kits")
    want, want_affine = nifti.to_canonical(hu, affine)
    got, got_affine, spacing = data.read_nifti(kits_root / "case_00001" / "imaging.nii.gz")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_affine, want_affine, atol=1e-4)
    np.testing.assert_allclose(spacing, nifti.spacing_of(affine), rtol=1e-6)


def test_kits_phantom_has_two_kidneys_darker_tumours_and_no_liver_label():
    shape = (128, 128, 48)
    hu, label, affine = phantom.generate_case(4, shape, task="kits")
    ras, _ = nifti.to_canonical(label, affine)
    hu_ras, _ = nifti.to_canonical(hu, affine)
    kidney_x = np.nonzero(ras == 1)[0]
    assert (kidney_x < 56).any() and (kidney_x > 72).any()          # both sides of the midline
    assert ndimage.label(ras >= 1)[1] >= 2
    assert np.median(hu_ras[ras == 2]) < np.median(hu_ras[ras == 1]) - 30   # hypodense
    # The same abdomen as LiTS's phantom: its liver is background here.
    _, lits_label, _ = phantom.generate_case(4, shape)
    assert (label[lits_label == 1] == 0).mean() > 0.95
    with pytest.raises(ValueError, match="--task"):
        phantom.generate_case(5, (8, 8, 8), task="brats")


def test_z_score_uses_isensees_kits19_statistics():
    hu = np.array([-1000, -79, 101, 177.9, 304, 2000], np.float32)
    z = kits.normalise(hu)
    np.testing.assert_allclose(z, [-180 / 76.9, -180 / 76.9, 0, 1, 203 / 76.9, 203 / 76.9],
                               atol=1e-6)
    assert kits.network_range() == pytest.approx((-180 / 76.9, 203 / 76.9))
    assert hu[0] == -1000                                          # input untouched


def test_spacing_after_preprocessing_is_wangs(tmp_path):
    """3.22 × 1.62 × 1.62 mm (z, y, x) = (1.62, 1.62, 3.22) in hrseg's canonical (x, y, z)."""
    assert KITS.native_spacing_mm == kits.SPACING_MM == (1.62, 1.62, 3.22)
    hu = np.full((64, 64, 40), 101, np.int16)
    _kits_case(tmp_path, "case_00000", hu, np.zeros(hu.shape, np.uint8))
    [case] = data.find_cases(tmp_path)
    image, label, meta = data.preprocess_case(case, KITS)
    assert image.shape == label.shape == (32, 32, 20)               # 64×0.81/1.62, 40×1.61/3.22
    g = meta["grid"]
    realised = np.array(meta["spacing"]) * np.array(g["scale"])
    np.testing.assert_allclose(realised, (1.62, 1.62, 3.22), rtol=1e-6)
    np.testing.assert_allclose(image, 0.0, atol=1e-6)              # 101 HU is the mean: z = 0
    assert meta["preprocess"] == "kits"


def test_in_plane_is_cropped_to_256_around_the_centre_and_maps_back():
    hu = np.zeros((600, 540, 4), np.float32)
    hu[290:310, 260:280] = 300.0                                    # a marker in the middle
    spacing = (0.81, 0.81, 3.22)                                    # -> 300 × 270 × 4
    g = dataset.grid_for(hu.shape, spacing, KITS)
    assert g.out_shape == (256, 256, 4) and g.crop
    image = dataset.preprocess(hu, spacing, KITS)
    assert image.shape == (256, 256, 4)
    xs, ys = np.nonzero(image[:, :, 0] > 2)                         # the marker, z ≈ 2.6
    assert abs(xs.mean() - 127.5) < 1.5 and abs(ys.mean() - 127.5) < 1.5
    # Labels back on the source grid: the crop's inside comes back, its outside is background.
    pred = np.ones(g.out_shape, np.uint8)
    back, _ = data.to_original_geometry(pred, {"grid": g.to_dict(), "affine": np.eye(4)})
    assert back.shape == hu.shape
    inside_x = np.nonzero(back[:, 270, 0])[0]
    assert inside_x.min() == pytest.approx((600 - 512) / 2, abs=2)   # 22 × 2 source voxels cut
    assert inside_x.max() == pytest.approx(600 - 1 - (600 - 512) / 2, abs=2)
    assert back[:, :7, 0].sum() == 0 and back[:, -7:, 0].sum() == 0  # y: 7 × 2 cut each side
    small = dataset.grid_for((300, 200, 4), spacing, KITS)          # -> 150 × 100: no padding
    assert small.out_shape == (150, 100, 4) and not small.crop


def test_loaded_phantom_is_z_scored_at_the_native_spacing(kits_root, tmp_path):
    cfg = DataConfig(root=str(kits_root), cache_dir=str(tmp_path), layout="kits",
                     preprocess="kits", resample="native", n_val=1)
    ds = data.load_dataset(cfg)
    lo, hi = kits.network_range()
    for v in ds.train + ds.val:
        img = np.asarray(v.image)
        assert img.min() == pytest.approx(lo, abs=1e-5) and img.max() <= hi + 1e-5   # air: lo
        assert max(img.shape[:2]) <= 256
        g = v.meta["grid"]                                 # canonical (x, y, z) axes
        realised = np.array(v.meta["spacing"]) * np.array(g["scale"])
        n = np.array(g["in_shape"]) / np.array(g["scale"])  # voxels before any crop
        assert (np.abs(realised / np.array(kits.SPACING_MM) - 1) <= 0.5 / n + 1e-9).all()
        assert set(np.unique(v.label).tolist()) <= {0, 1, 2} and (v.label == 1).any()
        # kidney voxels: the z-score of their HU (clipped), up to the resampling's averaging
        hu, _, _ = data.read_nifti(v.meta["image_path"])
        lab, _, _ = data.read_nifti(v.meta["label_path"])
        want = float(kits.normalise(hu[lab == 1]).mean())
        assert float(img[np.asarray(v.label) == 1].mean()) == pytest.approx(want, abs=0.35)
    assert Path(dataset.cache_dir(cfg)).name.startswith("kits-native-")


def test_verify_catches_broken_kits_cases(kits_root, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(kits_root, root)
    img = np.zeros((6, 5, 4), np.int16)
    _kits_case(root, "case_00003", image=img)                                     # no label
    _kits_case(root, "case_00004", img, np.full(img.shape, 3, np.uint8))         # label 3
    _kits_case(root, "case_00005", img, np.zeros((6, 5, 3), np.uint8))           # shape
    _kits_case(root, "case_00006", img, np.zeros(img.shape, np.uint8),
               label_affine=np.diag([0.81, 0.81, 3.22, 1.0]))                    # affine
    _kits_case(root, "case_00007", label=np.zeros(img.shape, np.uint8))          # no image
    problems = data.verify_dataset(root)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for want in ("case_00003/imaging.nii.gz: missing partner file (no label)",
                 ("case_00004/imaging.nii.gz / case_00004/segmentation.nii.gz: labels outside "
                  "{0, 1, 2}: 120 voxels"),
                 "case_00005/imaging.nii.gz / case_00005/segmentation.nii.gz: shape mismatch",
                 "case_00006/imaging.nii.gz / case_00006/segmentation.nii.gz: affine mismatch",
                 "case_00007/segmentation.nii.gz: missing partner file (no image)"):
        assert want in text, f"missing '{want}' in:\n{text}"
    assert "case_0000" + "0" not in text and "case_00002" not in text
    capsys.readouterr()
    assert cli.main(["verify", str(root)]) == 1
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 5 and "5 problem(s)" in out.err
    with pytest.raises(ValueError, match="without a label"):       # training refuses it too
        data.load_dataset(DataConfig(root=str(root), cache_dir=str(tmp_path / "c"),
                                     preprocess="kits", resample="native"))


def test_preprocess_option_is_checked():
    with pytest.raises(ValueError, match="data.preprocess.*'kits' with data.resample 'native'"):
        DataConfig(preprocess="kits")                              # resample: stretch
    with pytest.raises(ValueError, match="data.preprocess"):
        DataConfig(preprocess="zscore", resample="native")
    with pytest.raises(ValueError, match="data.layout 'kits19'"):
        nifti.scan(ROOT, "kits19")


def test_prediction_file_is_named_as_kits19_submissions():
    from hrseg.train import evaluation
    got = evaluation.prediction_path("runs/r", "data/kits19/case_00210/imaging.nii.gz")
    assert got.name == "prediction_00210.nii.gz"
    assert evaluation.prediction_path("runs/r", "x/volume-3.nii").name == "prediction-3.nii.gz"


def test_smoke_config_trains_wangs_data_path(kits_root, tmp_path):
    cfg = config.load(SMOKE)
    assert (cfg.data.layout, cfg.data.preprocess, cfg.data.resample) == ("kits", "kits", "native")
    assert cfg.model.classes == 3 and cfg.train.steps <= 3
    assert cli.main(["train", "-f", str(SMOKE), "--quiet", "--set", f"data.root={kits_root}",
                     f"data.cache_dir={tmp_path}/cache", f"train.out_dir={tmp_path}/runs"]) == 0
    run = tmp_path / "runs" / cfg.train.name
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    [meta] = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("case_00000-*.json")]
    assert meta["preprocess"] == "kits" and meta["native_spacing_mm"] == [8.0, 8.0, 16.0]
    # predict a KiTS file: labels back on its own (z, y, x) voxel grid, with its affine
    image = kits_phantom.case_dir(kits_root, 2) / kits_phantom.IMAGE
    assert cli.main(["predict", str(run), str(image)]) == 0
    pred = nib.load(run / "predictions" / "prediction_00002.nii.gz")
    src = nib.load(image)
    assert pred.shape == src.shape == SHAPE[::-1]
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}
