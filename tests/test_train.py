"""train.py on one CPU device at 16³: the loop's files, resume after SIGKILL (bit-identical),
the NaN guard, evaluate/predict of a run directory and the CLI."""
import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from hrseg import atomic, cli, config, data, train
from hrseg.train import checkpoint, distributed

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "train" / "smoke" / "train_smoke.yaml"


def smoke(dataset, out, *overrides):
    """The smoke config on the test dataset, runs under ``out``."""
    return config.load(SMOKE, [f"data.root={dataset}", f"data.cache_dir={dataset}/cache",
                               f"train.out_dir={out}", *overrides])


def same_json(a, b):  # NaN-tolerant equality of result dicts
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_step_decay_schedule_and_optimizers():
    t = config.TrainConfig(lr=3e-3, lr_decay=0.3, lr_decay_every=10)
    s = train.make_schedule(t)
    assert math.isclose(float(s(9)), 3e-3, rel_tol=1e-6)
    assert math.isclose(float(s(10)), 9e-4, rel_tol=1e-6)         # 3e-3 × 0.3
    assert math.isclose(float(s(25)), 3e-3 * 0.09, rel_tol=1e-6)  # two decays
    assert float(train.make_schedule(config.TrainConfig(lr_decay_every=0))(10 ** 6)) == \
        pytest.approx(3e-3)
    for name in ("adafactor", "adam"):
        train.make_optimizer(config.TrainConfig(optimizer=name))
    with pytest.raises(ValueError, match="train.optimizer 'sgd'"):
        train.make_optimizer(config.TrainConfig(optimizer="sgd"))


def test_local_rows_on_one_process():
    from hrseg.parallel import partition
    mesh = partition.make_mesh()
    sh = partition.sharding(mesh, partition.volume_spec(3))
    assert distributed.local_rows(sh, (4, 8, 8, 8, 1)) == (0, 1)


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "a" / "eval.json"
    atomic.write_json(path, {"x": np.float32(0.5), "v": np.arange(3)})
    assert json.loads(path.read_text()) == {"x": 0.5, "v": [0, 1, 2]}
    with pytest.raises(TypeError):
        atomic.write_json(path, {"x": object()})
    assert json.loads(path.read_text())["x"] == 0.5          # the old file survives a failure
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]   # no temp files left


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = smoke(dataset, out, "train.name=smoke")
    return cfg, train.train(cfg, progress=False)


def test_train_writes_the_run_directory(trained):
    cfg, result = trained
    run = result.run_dir
    assert config.load(run / "config.yaml") == cfg
    lines = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, cfg.train.steps + 1))
    assert all(math.isfinite(r["loss"]) and r["voxels_per_s"] > 0 for r in steps)
    assert any("eval" in r for r in lines)
    ckpts = checkpoint.Checkpoints(run / "checkpoints", read_only=True)
    assert ckpts.latest() == cfg.train.steps
    assert len(ckpts.steps()) <= cfg.train.keep_ckpts
    evals = ckpts.evals()
    assert cfg.train.steps in evals
    saved = evals[cfg.train.steps]
    assert saved["config"] == config.to_dict(cfg)         # the config that produced it
    assert same_json(saved["metrics"], result.eval)
    summary = json.loads((run / "result.json").read_text())
    assert summary["steps"] == cfg.train.steps
    assert summary["step_time_s"] > 0 and summary["voxels_per_s"] > 0
    ckpts.close()


def test_train_writes_tensorboard_events(trained):
    """The run directory holds TensorBoard event files with metrics.jsonl's numbers and a
    validation image per evaluation (tblog.py; read back by tests/test_tblog.py's reader)."""
    from tests.test_tblog import read_run
    _, result = trained
    lines = read_jsonl(result.run_dir / "metrics.jsonl")
    scalars, images, _ = read_run(result.run_dir)
    steps = [r for r in lines if "loss" in r]
    assert scalars["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in steps},
                                                  rel=1e-6)    # float32 in the event file
    for tag in ("train/grad_norm", "train/lr", "time/step_s", "train/dice_liver"):
        assert sorted(scalars[tag]) == [r["step"] for r in steps], tag
    ev = next(r for r in lines if "eval" in r)
    assert scalars["eval/liver_dice_global"][ev["step"]] == pytest.approx(
        ev["eval"]["liver_dice_global"], rel=1e-6)
    [(tag, by_step)] = images.items()                   # n_val 1: one validation case
    assert tag == f"validation/{ev['eval']['case_ids'][0]}" and ev["step"] in by_step
    assert by_step[ev["step"]].shape[1] == 3 * by_step[ev["step"]].shape[0]   # 3 square panels


def test_resume_of_a_finished_run_trains_nothing(trained):
    cfg, first = trained
    again = train.train(cfg, progress=False)
    assert again.resumed_from == cfg.train.steps and again.final_loss is None
    assert same_json(again.eval, first.eval)
    fresh = config.load(first.run_dir / "config.yaml", ["train.resume=false"])
    with pytest.raises(ValueError, match="already has checkpoints.*train.resume=true"):
        train.train(fresh, progress=False)
    assert config.load(first.run_dir / "config.yaml") == cfg      # left as it was


CHILD = """
import os, signal, sys
from hrseg import config, train
kill_at = int(sys.argv[1])
def hook(step, record):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
train.train(config.load(sys.argv[2], sys.argv[3:]), progress=False, on_step=hook)
"""


def _final_state(run_dir):
    _, _, state, _, step = train.load_run(run_dir)
    return step, jax.device_get(state)


def test_resume_after_sigkill_is_bit_identical(dataset, tmp_path):
    over = ["train.steps=7", "train.ckpt_every=2", "train.eval_every=-1"]
    killed = smoke(dataset, tmp_path, "train.name=killed", *over)
    args = [f"data.root={dataset}", f"data.cache_dir={dataset}/cache",
            f"train.out_dir={tmp_path}", "train.name=killed", *over]
    proc = subprocess.run([sys.executable, "-c", CHILD, "5", str(SMOKE), *args],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = checkpoint.Checkpoints(tmp_path / "killed" / "checkpoints", read_only=True)
    newest = ckpts.latest()
    ckpts.close()
    assert newest in (2, 4)                   # step 4's async save may not have finished
    resumed = train.train(killed, progress=False)
    assert resumed.resumed_from == newest
    steps = [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 8))         # lines past the checkpoint were replaced

    train.train(smoke(dataset, tmp_path, "train.name=straight", *over), progress=False)
    step_a, a = _final_state(tmp_path / "killed")
    step_b, b = _final_state(tmp_path / "straight")
    assert step_a == step_b == 7
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(dataset, tmp_path, monkeypatch):
    real = data.batch_for_step

    def poisoned(ds, step, *args, **kw):
        images, labels = real(ds, step, *args, **kw)
        if step == 2:                         # the third step (step number 3)
            images = np.full_like(images, np.nan)
        return images, labels

    monkeypatch.setattr(data, "batch_for_step", poisoned)
    cfg = smoke(dataset, tmp_path, "train.name=nan", "train.steps=6", "train.ckpt_every=2",
                "train.eval_every=-1")
    with pytest.raises(FloatingPointError, match=r"step 3: the loss is nan.*checkpoint is step 2"):
        train.train(cfg, progress=False)
    ckpts = checkpoint.Checkpoints(tmp_path / "nan" / "checkpoints", read_only=True)
    assert ckpts.latest() == 2
    ckpts.close()


def test_wang_recipe_trains_fp16_on_a_plateau_and_records_empty_dice(dataset, tmp_path):
    """Wang et al.'s recipe end to end (shrunk to 4 base filters): their network with Compact
    ConvBlocks and in-place ABN, fp16 with loss scaling, Adam on the plateau schedule, Dice +
    CE; Hou's empty-mask convention (0.0), recorded in the evaluation."""
    cfg = smoke(dataset, tmp_path, "train.name=wang", "model.preset=wang_compact",
                "model.base=4", "model.norm=inplace_abn", "model.precision=fp16",
                "train.optimizer=adam", "train.lr=4e-4", "train.schedule=plateau",
                "train.plateau_patience=1", "train.epoch_steps=1", "train.loss=dice_ce_wang",
                "train.steps=3", "train.empty_dice=0.0")
    result = train.train(cfg, progress=False)
    steps = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["loss_scale"] >= 1.0 for r in steps)                    # fp16: scaled
    assert steps[0]["lr"] == pytest.approx(4e-4)                         # plateau scale 1
    assert all(r["lr"] in (pytest.approx(4e-4), pytest.approx(1.2e-4),
                           pytest.approx(3.6e-5)) for r in steps)
    assert result.eval["empty_dice"] == 0.0
    saved = checkpoint.Checkpoints(result.run_dir / "checkpoints", read_only=True)
    assert saved.evals()[3]["metrics"]["empty_dice"] == 0.0
    saved.close()


def test_evaluate_run_dir(trained):
    cfg, result = trained
    again = train.evaluate(result.run_dir)
    assert again["step"] == cfg.train.steps
    assert same_json(again, result.eval)                      # same weights, same Dice


def test_predict_keeps_the_input_geometry(trained, dataset, tmp_path):
    _, result = trained
    src = min(Path(dataset).glob("volume-*.nii*"))
    img = nib.load(src)
    vol = np.asarray(img.dataobj)[:37, 3:34, :19]             # odd shape
    affine = img.affine.copy()
    affine[:3, 3] += 12.5                                     # moved origin
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "volume-7.nii.gz")
    out = train.predict(result.run_dir, tmp_path / "volume-7.nii.gz", tmp_path / "pred.nii.gz")
    pred = nib.load(out)
    assert pred.shape == vol.shape
    np.testing.assert_allclose(pred.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    # no -o: the viewer's convention <run>/predictions/prediction-N.nii.gz
    default = train.predict(result.run_dir, tmp_path / "volume-7.nii.gz")
    assert default == result.run_dir / "predictions" / "prediction-7.nii.gz" and default.exists()


def test_cli_evaluate_and_predict(trained, tmp_path, dataset, capsys):
    _, result = trained
    assert cli.main(["evaluate", str(result.run_dir)]) == 0
    assert "step" in capsys.readouterr().out
    src = min(Path(dataset).glob("volume-*.nii*"))
    assert cli.main(["predict", str(result.run_dir), str(src), "-o",
                     str(tmp_path / "p.nii.gz")]) == 0
    assert nib.load(tmp_path / "p.nii.gz").shape == nib.load(src).shape


def test_cli_train_unknown_key_is_an_error(capsys):
    assert cli.main(["train", "-f", str(SMOKE), "--set", "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_2d_network_trains_on_slices_and_evaluates_whole_volumes(dataset, tmp_path):
    cfg = smoke(dataset, tmp_path, "train.name=2d", "model.dims=2", "data.resolution=[16,16]",
                "train.steps=2", "train.batch=4", "train.ckpt_every=0")
    result = train.train(cfg, progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert result.eval["cases"] == 1 and "tumour_dice_global" in result.eval
    _, graphdef, state, layout, _ = train.load_run(result.run_dir)
    from hrseg.train import inference
    vol = np.random.default_rng(0).random((16, 16, 7), np.float32)
    predictor = inference.Predictor(cfg, graphdef, layout)
    seen, forward = [], predictor._predict
    predictor._predict = lambda p, r, x: seen.append(x.shape[0]) or forward(p, r, x)
    [labels] = predictor(state, [vol])
    assert labels.shape == (16, 16, 7) and labels.dtype == np.int32
    assert seen == [7]   # one pass of the 7 slices, not padded up to the pixel budget (4096)


def test_patch_run_resumes_bit_identically_and_evaluates_by_sliding_window(dataset, tmp_path,
                                                                           monkeypatch):
    from hrseg.train import sliding
    over = ["data.patch=[8,8,8]", "data.patch_foreground=0.5", "train.ckpt_every=2"]
    first = train.train(smoke(dataset, tmp_path, "train.name=pieces", "train.steps=3",
                              "train.eval_every=-1", *over), progress=False)
    resumed = train.train(smoke(dataset, tmp_path, "train.name=pieces", "train.steps=6",
                                "train.eval_every=-1", *over), progress=False)
    assert (first.steps, resumed.resumed_from, resumed.steps) == (3, 3, 6)
    straight = train.train(smoke(dataset, tmp_path, "train.name=straight", "train.steps=6",
                                 "train.eval_every=0", *over), progress=False)
    _, a = _final_state(tmp_path / "pieces")
    _, b = _final_state(tmp_path / "straight")
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    steps = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert all(r["voxels_per_s"] == pytest.approx(8 ** 3 / r["step_time_s"]) for r in steps)
    # `hrseg evaluate` of a patch run picks sliding windows from the run's config
    calls = []
    real = sliding.sliding_window
    monkeypatch.setattr(sliding, "sliding_window",
                        lambda fn, image, patch, **kw: calls.append(patch) or real(fn, image,
                                                                                   patch, **kw))
    again = train.evaluate(tmp_path / "pieces")
    assert calls == [(8, 8, 8)] and again["cases"] == 1
    assert same_json(again, straight.eval)                    # same weights, same Dice


# --- resample: native (buckets.py) ---------------------------------------------------------
@pytest.fixture(scope="module")
def native_dataset(tmp_path_factory):
    from tests.test_buckets import write_native_dataset
    return write_native_dataset(tmp_path_factory.mktemp("native"))


def native(dataset, out, *overrides):
    """The smoke config, native sizes at the fixture's own spacing (each case its shape)."""
    return smoke(dataset, out, "data.resample=native", "data.native_spacing_mm=[4.0,4.0,6.0]",
                 *overrides)


def test_native_run_resumes_bit_identically_in_buckets(native_dataset, tmp_path):
    over = ["train.batch=2", "train.ckpt_every=2", "train.eval_every=-1"]
    first = train.train(native(native_dataset, tmp_path, "train.name=pieces", "train.steps=3",
                               *over), progress=False)
    resumed = train.train(native(native_dataset, tmp_path, "train.name=pieces",
                                 "train.steps=6", *over), progress=False)
    assert (first.steps, resumed.resumed_from, resumed.steps) == (3, 3, 6)
    straight = train.train(native(native_dataset, tmp_path, "train.name=straight",
                                  "train.steps=6", "train.batch=2", "train.ckpt_every=2",
                                  "train.eval_every=0"), progress=False)
    _, a = _final_state(tmp_path / "pieces")
    _, b = _final_state(tmp_path / "straight")
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    steps = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert len({round(r["voxels_per_s"] * r["step_time_s"]) for r in steps}) > 1  # buckets
    assert straight.eval["cases"] == 1 and math.isfinite(straight.eval["liver_dice_global"])


def test_native_predict_returns_every_label_on_the_original_grid(native_dataset, tmp_path,
                                                                  monkeypatch):
    """A network replaced by one that reads the label off the image: `hrseg predict` and the
    evaluation then give back every labelled voxel, on the file's own grid (nothing cropped
    by the padding, nothing lost by the uncrop)."""
    import jax.numpy as jnp

    from hrseg.train import inference, step
    cfg = native(native_dataset, tmp_path, "train.name=ident", "train.steps=1",
                 "train.eval_every=-1", "data.native_spacing_mm=[2.0,2.0,3.0]")
    run = train.train(cfg, progress=False).run_dir
    lo, hi = cfg.data.hu_window

    def make_predict(graphdef, layout, ndim):    # HU = 100 × label -> the label
        def predict(params, rest, x):
            hu = x[..., 0] * (hi - lo) + lo
            return jnp.round(hu / 100).astype(jnp.int32), None
        return predict

    monkeypatch.setattr(step, "make_predict", make_predict)
    for seg in sorted(Path(native_dataset).glob("segmentation-*.nii.gz")):
        lab = nib.load(seg)
        labels = np.asarray(lab.dataobj)
        vol = tmp_path / seg.name.replace("segmentation", "volume")
        nib.save(nib.Nifti1Image((labels * 100).astype(np.int16), lab.affine), vol)
        out = nib.load(train.predict(run, vol, tmp_path / f"pred-{seg.name}"))
        np.testing.assert_array_equal(np.asarray(out.dataobj), labels)
        np.testing.assert_allclose(out.affine, lab.affine, atol=1e-5)
    # evaluation of the same stand-in on the native grid: prediction = label, Dice 1
    _, graphdef, state, layout, _ = train.load_run(run)
    ds = data.load_dataset(cfg.data)
    cases = [dataclasses.replace(v, image=(v.label * 100 - lo) / (hi - lo)) for v in ds.train]
    result = inference.Evaluator(cfg, graphdef, layout, cases)(state)
    assert result["liver_dice_global"] == 1.0 and result["cases"] == len(cases)


@pytest.mark.parametrize("item, match", [
    ("data.resample=cube", r"'data.resample': 'cube' is not one of stretch, spacing, native"),
    ("data.native_spacing_mm=[1,0,3]", r"'data.native_spacing_mm': sizes must be > 0"),
    ("data.native_spacing_mm=[1,2]", r"'data.native_spacing_mm': expected 3 values"),
    ("data.buckets_per_octave=0", r"'data.buckets_per_octave': must be >= 1"),
])
def test_cli_native_config_errors_are_one_line(item, match, capsys):
    import re
    assert cli.main(["train", "-f", str(SMOKE), "--set", "data.resample=native", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrseg train: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert cli.main(["train", "-f", str(SMOKE), "--set", "data.resample=native",
                     "data.patch=[8,8,8]"]) == 2
    assert "'data.patch': patches are cut from the cube" in capsys.readouterr().err
