"""cli.py: SIGINT / SIGTERM in `hrseg train` and `hrseg run` — one line, the children's process
groups (papermill kernels in their own sessions) stopped and waited for, the lock released,
rc 130 / 143, and the next run resumes (issue 31)."""
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from hrseg import config, train
from hrseg.train import rundir

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "train" / "smoke" / "train_smoke.yaml"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _wait(what, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("hrseg ")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_train_in_one_line_and_the_next_run_resumes(dataset, tmp_path, sig):
    sets = [f"data.root={dataset}", f"data.cache_dir={tmp_path}/cache",
            f"train.out_dir={tmp_path}", "train.eval_every=-1", "train.ckpt_every=2",
            "train.steps=100000"]
    child = subprocess.Popen([sys.executable, "-m", "hrseg.cli", "train", "-f", str(SMOKE),
                              "--quiet", "--set", *sets], env=ENV, stderr=subprocess.PIPE,
                             text=True)
    run = tmp_path / "smoke"
    try:
        _wait(lambda: len(rundir.read_metrics(run / rundir.METRICS)) >= 3)
        child.send_signal(sig)
        err = child.communicate(timeout=120)[1]
    finally:
        child.kill()
    assert child.returncode == 128 + sig, err
    [line] = _lines(err)
    assert line.startswith(f"hrseg train: stopped by {signal.Signals(sig).name}; "), line
    with open(run / rundir.LOCK) as fh:                    # released
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    newest = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    cfg = config.load(SMOKE, sets[:-1] + [f"train.steps={newest + 1}"])
    again = train.train(cfg, progress=False)
    assert again.resumed_from == newest and again.steps == newest + 1


def _sleeping_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    cell = nbformat.v4.new_code_cell("x = 0\nout_dir = 'runs'")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("import time\ntime.sleep(600)")]
    nbformat.write(nb, path)


@pytest.mark.parametrize("jobs", [2, 1])
def test_sigterm_to_run_stops_the_notebooks_and_their_kernels(tmp_path, jobs):
    """The issue's case: `hrseg run --jobs 2`, then `kill -TERM <parent>`: before, both
    children and their kernels (each in its own session) kept running. With --jobs 1 the
    kernel is this process's own child, in its own session too."""
    nbdir, params = tmp_path / "notebooks", tmp_path / "params"
    nbdir.mkdir()
    params.mkdir()
    for name in ("01_a", "02_b", "03_last"):    # the last notebook runs after the others
        _sleeping_notebook(nbdir / f"{name}.ipynb")
        (params / f"{name}.yaml").write_text("x: 1\n")
    child = subprocess.Popen(
        [sys.executable, "-m", "hrseg.cli", "run", "--params-dir", str(params), "--out",
         str(tmp_path / "out"), "--jobs", str(jobs), "--quiet"],
        env=dict(ENV, HRSEG_NOTEBOOKS=str(nbdir)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        def kernels():
            procs = psutil.Process(child.pid).children(recursive=True)
            ks = [p for p in procs if "ipykernel" in " ".join(p.cmdline())]
            return procs if len(ks) == jobs else None
        procs = _wait(kernels, timeout=180)
        time.sleep(1)                                    # the kernels run the sleeping cell
        child.send_signal(signal.SIGTERM)
        err = child.communicate(timeout=120)[1]
    finally:
        child.kill()
    assert child.returncode == 143, err
    [line] = _lines(err)
    assert line.startswith("hrseg run: stopped by SIGTERM; "), line
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline()) for p in alive]


def test_an_unusable_compilation_cache_costs_one_line_not_the_run(tmp_path, monkeypatch,
                                                                  capsys):
    """`.cache/jax` a file, or a working directory that is gone: one line, run without it."""
    import jax

    from hrseg import runtime
    from hrseg.runtime import compile_cache
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setattr(runtime, "_current", list(runtime._current))
    try:
        monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
        (tmp_path / ".cache").mkdir()
        (tmp_path / ".cache" / "jax").write_text("a file")
        monkeypatch.chdir(tmp_path)
        runtime.start(command="hrseg train")
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("hrseg train: compilation cache off: ") and \
            "jax exists and is not a folder; running without it" in line, line
        assert jax.config.jax_compilation_cache_dir is None
        assert runtime.current().compile_cache is None and not runtime.current().step_cache
        gone = tmp_path / "gone"
        gone.mkdir()
        monkeypatch.chdir(gone)
        gone.rmdir()
        runtime.start(command="hrseg run")
        [line] = capsys.readouterr().err.splitlines()
        assert "no usable working directory" in line, line
        monkeypatch.chdir(tmp_path)
        (tmp_path / "shared").mkdir(mode=0o777)
        (tmp_path / "shared").chmod(0o777)
        monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "shared"))
        runtime.start(command="hrseg train")
        assert "writable by others" in capsys.readouterr().err
        assert compile_cache.ENV_DIR not in os.environ     # the children do not use it either
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
