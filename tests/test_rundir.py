"""hrseg/atomic.py and hrseg/train/rundir.py without training: atomic writes (mode, no temp
files, a full disk names the file), the metrics reader, the lock, config checks at load."""
import errno
import json
import os
import subprocess
import sys

import pytest

from hrseg import atomic, cli, config
from hrseg.train import rundir


def test_atomic_files_get_the_mode_of_open_and_leave_no_temp_files(tmp_path):
    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    atomic.write_text(tmp_path / "b.txt", "hi")
    mode = lambda p: p.stat().st_mode & 0o777
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.txt") == mode(tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "plain"]


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic.write_json(path, {"old": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(atomic.DiskFull) as err:
        atomic.write_json(path, {"new": 2})
    assert str(err.value) == f"no space left on device writing {path}"
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_metrics_reader_names_file_and_line_and_drops_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')     # killed mid-line
    assert [r["step"] for r in rundir.read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path} line 2: not a JSON record"):
        rundir.read_metrics(path)
    # the results table reads step times through the same reader
    from hrseg.workbench import results
    with pytest.raises(ValueError, match="line 2"):
        results.step_time(tmp_path)


HOLD = """
import sys, time
from hrseg.train import rundir
rundir.Lock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_is_exclusive_and_released_by_sigkill(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunBusy, match=rf"{run} is in use by process {child.pid}"):
            rundir.Lock(run).acquire()
    finally:
        child.kill()
        child.wait()
    lock = rundir.Lock(run).acquire()          # the kernel released the dead process's lock
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    lock.release()


@pytest.mark.parametrize("item, key", [
    ("train.lr=0", "train.lr"), ("train.lr=-1e-3", "train.lr"),
    ("train.steps=-1", "train.steps"), ("train.batch=0", "train.batch"),
    ("train.eval_every=-2", "train.eval_every"), ("train.ckpt_every=-1", "train.ckpt_every"),
    ("train.keep_ckpts=0", "train.keep_ckpts"), ("mesh.spatial=[2,0,1]", "mesh.spatial"),
    ("mesh.data=0", "mesh.data"), ("data.resolution=[16,16]", "data.resolution"),
])
def test_bad_values_are_refused_at_load_naming_the_key(item, key):
    with pytest.raises(ValueError, match=rf"^--set: config key '{key}' must"):
        config.load(None, [item])


def test_off_values_stay_valid():
    cfg = config.load(None, ["train.eval_every=-1", "train.ckpt_every=0", "train.steps=0",
                             "train.lr_decay_every=0", "train.grad_clip=0"])
    assert cfg.train.eval_every == -1 and cfg.train.steps == 0


def test_a_set_typo_is_a_set_problem(capsys):
    smoke = "params/train/smoke/train_smoke.yaml"
    assert cli.main(["train", "-f", smoke, "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hrseg train: error: --set: unknown config key 'train.stepz'"), err
    assert len(err.splitlines()) == 1


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  batch: 0\n")
    with pytest.raises(ValueError, match=rf"^{f}: config key 'train.batch' must be >= 1"):
        config.load(f)


def test_config_changes_on_resume(tmp_path):
    base = config.load(None, ["model.base=8", f"train.out_dir={tmp_path}"])
    run = rundir.path_of(base)
    run.mkdir(parents=True)
    rundir.record_start(run, base, 0)
    more = config.load(None, ["model.base=8", f"train.out_dir={tmp_path}", "train.steps=500"])
    assert rundir.check_resume(run, more) == {"train.steps": (200, 500)}
    rundir.record_start(run, more, 200)
    assert rundir.history(run)[-1]["changed"] == {"train.steps": [200, 500]}
    other = config.load(None, ["model.base=16", f"train.out_dir={tmp_path}"])
    with pytest.raises(rundir.ConfigChanged, match=r"model\.base: 8 -> 16.*train\.name="):
        rundir.check_resume(run, other)
