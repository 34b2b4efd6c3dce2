"""The contract of every command (issue 31): a bad input or fault is rc != 0, exactly one
``hrseg <cmd>: error: ...`` line, no traceback — and, by snapshotting every folder before and
after (paths, sizes, mtimes, SHA-256), no file outside the command's own outputs changed.

One smoke run is trained per module; the bad inputs are made once beside it. Commands run
in-process (cli.main); none of them gets past its checks, so the table stays fast.
"""
import gzip
import hashlib
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from hrseg import cli, config, train
from hrseg.data import nifti, phantom
from hrseg.train import evaluation, rundir

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "train" / "smoke" / "train_smoke.yaml"


def _bomb_nifti(path: Path, shape) -> None:
    """A few bytes of .nii.gz whose header declares ``shape`` (int16)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))


def _zero_spacing_nifti(path: Path, like: Path) -> None:
    img = nib.load(like)
    hdr = img.header.copy()
    hdr["srow_z"] = [0, 0, 0, 0]
    hdr["qform_code"] = 0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, hdr), path)


def _eval_run(runs: Path, trained: Path, name: str, text: str) -> None:
    """A run folder (config of the trained run) whose one evaluation JSON is ``text``."""
    (runs / name / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / rundir.CONFIG, runs / name / rundir.CONFIG)
    (runs / name / "checkpoints" / "eval_00000004.json").write_text(text)


@pytest.fixture(scope="module")
def world(dataset, tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    cfg = config.load(SMOKE, [f"data.root={dataset}", f"data.cache_dir={w}/cache",
                              f"train.out_dir={w}/runs", "train.eval_every=0"])
    train.train(cfg, progress=False)
    run = rundir.path_of(cfg)
    user = w / "user"                      # a user's real data: never touched
    user.mkdir()
    shutil.copy(dataset / "volume-0.nii.gz", user / "volume-0.nii.gz")
    shutil.copy(dataset / "volume-1.nii.gz", user / "volume-7.nii.gz")
    (w / "a_file").write_text("not a folder\n")
    (w / "outdir" / "volume-0_pred.nii.gz").mkdir(parents=True)   # a folder under its name
    _bomb_nifti(w / "bomb.nii.gz", (1500, 1500, 1500))
    _bomb_nifti(w / "bomb_small.nii.gz", (1000, 1000, 1000))   # under the limit, not the file
    _zero_spacing_nifti(w / "zero_spacing.nii.gz", dataset / "volume-0.nii.gz")
    ours = w / "ours"
    phantom.write_dataset(ours, cases=2, seed=0, shape=(16, 16, 8))
    cfgs = w / "configs"
    cfgs.mkdir()
    (cfgs / "alias.yaml").write_text(          # the 376-byte alias bomb, one level
        'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n'
        'b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\ntrain:\n  name: [*b,*b,*b,*b,*b]\n')
    (cfgs / "big.yaml").write_text("# padding\n" * 150_000)    # 1.5 MB
    (cfgs / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    (cfgs / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    params = w / "params"
    params.mkdir()
    (params / "01_memory_estimation.yaml").write_text("x: &a 1\ny: *a\n")
    (w / "params_ok").mkdir()
    (w / "params_ok" / "01_memory_estimation.yaml").write_text("{}\n")
    tables = w / "tables"
    for name, text in (("empty_list", "[]"), ("null", "null"),
                       ("truncated", '{"step": 4, "metr')):
        _eval_run(tables / name, run, name, text)
    headless = w / "headless"                # checkpoints without config.yaml
    shutil.copytree(run, headless / run.name)
    (headless / run.name / rundir.CONFIG).unlink()
    return SimpleNamespace(w=w, data=dataset, run=run, user=user, ours=ours, cfgs=cfgs,
                           params=params, tables=tables, headless=headless / run.name)


def snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns,
                               hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = "dir" if p.is_dir() else "other"
    return out


def T(w):     # (command, argv, a fragment of the one error line)
    v0, run = w.user / "volume-0.nii.gz", str(w.run)
    smoke = ["train", "-f", str(SMOKE), "--set", f"data.root={w.data}",
             f"data.cache_dir={w.w}/cache", f"train.out_dir={w.w}/runs"]
    return [
        ("train", smoke + ["train.name="], "'train.name': not a string"),
        ("train", smoke + ["train.name=../../x"], "plain name"),
        ("train", smoke + ["train.name=/abs"], "plain name"),
        ("train", smoke + ["train.name=" + "a" * 300], "300 characters"),
        ("train", smoke + ["data.root={a: 1}"], "'data.root': not a string"),
        ("train", smoke + ["train.name=&a x"], "anchors and aliases"),
        ("train", ["train", "-f", str(w.cfgs / "alias.yaml")], "anchors and aliases"),
        ("train", ["train", "-f", str(w.cfgs / "big.yaml")], "more than a config may have"),
        ("train", ["train", "-f", str(w.cfgs / "deep.yaml")], "nested deeper than"),
        ("train", ["train", "-f", str(w.cfgs / "binary.yaml")], "not a text file"),
        ("train", ["train", "-f", str(w.cfgs / "missing.yaml")], "config file not found"),
        ("train", smoke + [f"train.out_dir={w.w}/a_file"], "a_file"),
        ("run", ["run", "--params-dir", str(w.params), "--only", "01", "--out",
                 str(w.w / "nb_out")], "anchors and aliases"),
        ("run", ["run", "--params-dir", str(w.w / "missing")], "params directory not found"),
        ("run", ["run", "--params-dir", str(w.w / "params_ok"), "--only", "01", "--out",
                 str(w.w / "a_file")], "a_file: File exists"),
        ("run", ["run", "--params-dir", str(w.params), "--jobs", "0"], "--jobs must be >= 1"),
        ("evaluate", ["evaluate", str(w.w / "missing")], "not a run directory"),
        ("evaluate", ["evaluate", str(w.w / "a_file")], "not a run directory"),
        ("predict", ["predict", run, str(v0), "-o", str(w.w / "p")], "-o "),
        ("predict", ["predict", run, str(v0), "-o", str(w.w / "p.img")], ".nii or .nii.gz"),
        ("predict", ["predict", run, str(v0), "-o", str(v0)], "the input volume"),
        ("predict", ["predict", run, str(v0), "-o", str(w.user / "." / "volume-0.nii.gz")],
         "the input volume"),
        ("predict", ["predict", run, str(v0), "-o", str(w.w / "outdir")],
         "volume-0_pred.nii.gz: exists and is not a file"),
        ("predict", ["predict", run, str(v0), "-o", str(w.w / "a_file" / "x.nii.gz")],
         "is a file, not a folder"),
        ("predict", ["predict", run, str(w.w / "bomb.nii.gz")], "more than the limit"),
        ("predict", ["predict", run, str(w.w / "bomb_small.nii.gz")], "but the file has"),
        ("predict", ["predict", run, str(w.w / "zero_spacing.nii.gz")], "voxel sizes"),
        ("predict", ["predict", run, str(w.w / "missing.nii.gz")], "no such file"),
        ("verify", ["verify", str(w.w / "missing")], "no such folder"),
        ("verify", ["verify", str(w.w / "a_file")], "not a folder"),
        ("table", ["table", str(w.tables / "empty_list")], "eval_00000004.json: not an eval"),
        ("table", ["table", str(w.tables / "null")], "eval_00000004.json: not an eval"),
        ("table", ["table", str(w.tables / "truncated")], "eval_00000004.json: not an eval"),
        ("table", ["table", str(w.w / "missing")], "no such folder"),
        ("table", ["table", str(w.w / "runs"), "--out", str(w.w / "a_file")], "a_file: "),
        ("memory", ["memory", "--budget", "1e999GiB", "--compile", "no"], "1e999GiB"),
        ("memory", ["memory", "--budget=-1GiB", "--compile", "no"], "finite size > 0"),
        ("memory", ["memory", "--budget", "16", "--compile", "no"], "give a unit"),
        ("memory", ["memory", "--devices", "1000000000", "--compile", "no"], "--devices"),
        ("memory", ["memory", "--devices", "0", "--compile", "no"], "--devices 0"),
        ("memory", ["memory", "--resolution", "0", "--compile", "no"], "--resolution"),
        ("memory", ["memory", "--resolution", "99999", "--compile", "no"], "--resolution"),
        ("phantom", ["phantom", "--cases", "2", "--shape", "64", "64", "32", "--out",
                     str(w.user)], "did not write (volume-0.nii.gz, volume-7.nii.gz)"),
        ("phantom", ["phantom", "--cases", "1", "--shape", "0", "0", "0", "--out",
                     str(w.ours)], "--shape"),
        ("phantom", ["phantom", "--cases", "1", "--shape", "16", "16", "8", "--out",
                     str(w.ours)], "holds a phantom of 2 cases, seed 0, shape 16 16 8"),
        ("phantom", ["phantom", "--cases", "0", "--out", str(w.w / "new")], "--cases"),
        ("phantom", ["phantom", "--out", str(w.w / "a_file")], "not a folder"),
        ("cache", ["cache", str(w.w / "missing")], "no such cache folder"),
        ("cache", ["cache", str(w.w / "a_file"), "--prune"], "no such cache folder"),
    ]


CASES = T(SimpleNamespace(**{k: Path("/W") for k in
                             ("w", "data", "run", "user", "ours", "cfgs", "params", "tables",
                              "headless")}))


@pytest.mark.parametrize("i", range(len(CASES)),
                         ids=[f"{c[0]}-{n}" for n, c in enumerate(CASES)])
def test_a_bad_input_is_one_line_and_changes_nothing(world, capsys, i):
    cmd, argv, fragment = T(world)[i]
    before = snapshot(world.w, world.data)
    t0 = time.perf_counter()
    rc = cli.main(argv)
    dt = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"hrseg {cmd}: error: ")]
    assert rc != 0 and len(lines) == 1, (rc, err)
    assert fragment in lines[0], lines[0]
    assert snapshot(world.w, world.data) == before, "a file changed"
    assert dt < 60, f"{dt:.0f} s"


def test_memory_answers_at_once_without_impossible_meshes(capsys):
    t0 = time.perf_counter()
    rc = cli.main(["memory", "--devices", "65536", "--resolution", "64", "--compile", "no"])
    out = capsys.readouterr().out
    assert time.perf_counter() - t0 < 20
    assert rc == 1 and "Nothing fits" in out and "65536 devices cannot split a 64×64×64" in out


def test_evaluate_on_a_read_only_run_prints_the_result_then_one_line(world, capsys,
                                                                       monkeypatch):
    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(evaluation.atomic, "write_json", refuse)
    before = snapshot(world.run)
    rc = cli.main(["evaluate", str(world.run)])
    out, err = capsys.readouterr()
    assert rc == 1 and f"{world.run} step 4: " in out and "liver_dice" in out, out
    [line] = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith("hrseg evaluate: error: the result could not be saved to ") \
        and "eval_00000004.json (Permission denied)" in line, line
    assert snapshot(world.run) == before


def test_predict_into_a_folder_writes_case_pred_there_and_nothing_else(world, tmp_path):
    before = snapshot(world.w, world.data)
    assert cli.main(["predict", str(world.run), str(world.user / "volume-0.nii.gz"),
                     "-o", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["volume-0_pred.nii.gz"]
    assert nib.load(tmp_path / "volume-0_pred.nii.gz").shape == \
        nib.load(world.user / "volume-0.nii.gz").shape
    assert snapshot(world.w, world.data) == before


def test_the_napari_reader_refuses_bad_headers_in_one_line(world):
    from hrseg.viz.napari import _reader
    for name, fragment in (("bomb.nii.gz", "more than the limit"),
                           ("zero_spacing.nii.gz", "voxel sizes")):
        with pytest.raises(ValueError, match=fragment) as e:
            _reader.read(world.w / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_a_symlinked_sub_folder_of_a_dataset_is_read(world, tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for kind in ("volume", "segmentation"):
        shutil.copy(world.data / f"{kind}-0.nii.gz", tmp_path / "ds" / f"{kind}-0.nii.gz")
        shutil.copy(world.data / f"{kind}-1.nii.gz", tmp_path / "elsewhere" / f"{kind}-1.nii.gz")
    (tmp_path / "ds" / "more").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "ds")      # no endless walk
    assert [c.id for c in nifti.find_cases(tmp_path / "ds")] == ["0", "1"]


def test_a_run_without_config_yaml_is_restored_from_its_checkpoints_or_refused(world, capsys,
                                                                               monkeypatch):
    """Issue 31: delete config.yaml, resume with another seed and data.n_val: before, rc 0
    and a history that recorded no change."""
    run = world.headless
    sets = [f"data.root={world.data}", f"data.cache_dir={world.w}/cache",
            f"train.out_dir={run.parent}", "train.seed=7", "data.n_val=2"]
    rc = cli.main(["train", "-f", str(SMOKE), "--set", *sets])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert "restored from the newest checkpoint's record" in lines[0]
    assert lines[-1].startswith("hrseg train: error: ") and "train.seed: 0 -> 7" in lines[-1]
    assert (run / rundir.CONFIG).read_text() == (world.run / rundir.CONFIG).read_text()
    (run / rundir.CONFIG).unlink()
    assert rundir.read_config(run) == rundir.read_config(world.run)   # evaluate / predict
    # checkpoints that record no config (written before they did): refused, nothing written
    from hrseg.train import checkpoint
    monkeypatch.setattr(checkpoint, "recorded_config", lambda d: None)
    before = snapshot(run)
    rc = cli.main(["train", "-f", str(SMOKE), "--set", *sets])
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and line.startswith("hrseg train: error: ") and \
        "has checkpoints but no config.yaml" in line, err
    assert cli.main(["evaluate", str(run)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert snapshot(run) == before
