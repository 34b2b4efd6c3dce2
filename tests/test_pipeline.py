"""pipeline.py / `hrseg run`: run discovery, parameter checks, and the one-line failure report.

The tests use a folder of throw-away notebooks (two cells; a real kernel, ~2 s each, for the
execution tests); the real notebooks run in tests/test_notebooks.py.
"""
import json
import os

import nbformat
import pytest

from hrseg import cli
from hrseg.workbench import pipeline
from hrseg.workbench.pipeline import PipelineError

NOTEBOOKS = ("01_memory_estimation", "02_halo_correctness", "03_augmentation", "04_train",
             "05_results_table")  # the fake notebooks' names


def _params_dir(tmp_path, names, extra=("train_64",)):
    d = tmp_path / "params"
    d.mkdir()
    for n in list(names) + list(extra):
        (d / f"{n}.yaml").write_text("x: 1\n")
    return d


def test_discover_orders_runs_by_notebook_and_skips_configs(tmp_path, fake_notebooks):
    d = _params_dir(tmp_path, ["05_results_table", "04_train_64", "04_train_32",
                               "01_memory_estimation", "02_halo_correctness", "03_augmentation"])
    runs = pipeline.discover(d)
    assert [r.name for r in runs] == ["01_memory_estimation", "02_halo_correctness",
                                      "03_augmentation", "04_train_32", "04_train_64",
                                      "05_results_table"]   # train_64.yaml is a config, not a run
    assert {r.notebook for r in runs if r.name.startswith("04")} == {"04_train"}


def test_discover_selects_and_refuses_what_matches_nothing(tmp_path, fake_notebooks):
    d = _params_dir(tmp_path, [*NOTEBOOKS[:3], "04_train_32", "04_train_64", NOTEBOOKS[4]])
    assert [r.name for r in pipeline.discover(d, ["02", "04_train_64"])] == [
        "02_halo_correctness", "04_train_64"]
    assert [r.name for r in pipeline.discover(d, ["04_train,05"])] == [
        "04_train_32", "04_train_64", "05_results_table"]
    with pytest.raises(PipelineError, match="--only 07: no such notebook"):
        pipeline.discover(d, ["07"])


def test_a_notebook_without_params_is_an_error_not_a_skip(tmp_path, fake_notebooks):
    d = _params_dir(tmp_path, [n for n in NOTEBOOKS if n != "03_augmentation"])
    with pytest.raises(PipelineError, match="no params for notebook.*03_augmentation"):
        pipeline.discover(d)
    assert len(pipeline.discover(d, ["01", "02"])) == 2     # not needed when not selected


def test_notebooks_are_the_numbered_ipynb_files_in_number_order(tmp_path, monkeypatch):
    for stem in ("10_late", "2_second", "01_first", "Untitled", "scratch_01"):
        _notebook(tmp_path / f"{stem}.ipynb")
    (tmp_path / "03_paired_text.py").write_text("# %%\n")      # a jupytext pair is not a notebook
    assert pipeline.notebook_names(tmp_path) == ("01_first", "2_second", "10_late")
    monkeypatch.setattr(pipeline, "notebooks_dir", lambda: tmp_path)
    d = _params_dir(tmp_path, ["10_late", "2_second_a", "01_first"])
    assert [r.notebook for r in pipeline.discover(d)] == ["01_first", "2_second", "10_late"]
    monkeypatch.setattr(pipeline, "notebooks_dir", lambda: tmp_path / "params")
    with pytest.raises(PipelineError, match="no numbered notebooks"):
        pipeline.discover(d)


def test_the_real_notebooks_are_discovered():
    names = pipeline.notebook_names()
    assert names[0].startswith("01_") and len(names) >= 5
    assert [int(n.split("_")[0]) for n in names] == sorted(int(n.split("_")[0]) for n in names)


def _notebook(path, *sources, params="x = 0"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


@pytest.fixture
def fake_notebooks(tmp_path, monkeypatch):
    """Five two-cell notebooks; 02 fails in its second code cell."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    for name in NOTEBOOKS:
        body = ["from pathlib import Path",
                f"Path(out_dir, 'ran_{name}').write_text(str(x))"]
        if name == "02_halo_correctness":
            body = ["y = x + 1", "z = 2 * y\nraise ValueError(f'boom {y}')"]
        _notebook(nbdir / f"{name}.ipynb", *body, params="x = 0\nout_dir = 'runs'")
    monkeypatch.setattr(pipeline, "notebooks_dir", lambda: nbdir)
    return nbdir


def test_failure_stops_the_pipeline_naming_notebook_cell_and_error(tmp_path, fake_notebooks,
                                                                   capsys):
    params = _params_dir(tmp_path, NOTEBOOKS)
    out = tmp_path / "runs"
    rc = cli.main(["run", "--params-dir", str(params), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1, err
    # the injected-parameters cell is In [2], so the failing cell is In [4]
    assert err[0].startswith("hrseg run: error: 02_halo_correctness failed in cell In [4], line 2 "
                             "(`raise ValueError(f'boom {y}')`): ValueError: boom 2 — see ")
    assert str(out / "02_halo_correctness.ipynb") in err[0]
    assert (out / "ran_01_memory_estimation").read_text() == "1"   # params reached the kernel
    assert (out / "02_halo_correctness.ipynb").is_file()           # kept for inspection
    assert not (out / "ran_03_augmentation").exists()              # nothing after the failure


def test_success_runs_every_notebook_into_out(tmp_path, fake_notebooks, capsys):
    params = _params_dir(tmp_path, [n for n in NOTEBOOKS if n != "02_halo_correctness"])
    out = tmp_path / "runs"
    (out / "results").mkdir(parents=True)
    (out / "results" / "results.md").write_text("| a |\n")
    rc = cli.main(["run", "--params-dir", str(params), "--out", str(out), "--only",
                   "01", "03", "04", "05"])
    assert rc == 0
    for name in ("01_memory_estimation", "03_augmentation", "04_train", "05_results_table"):
        assert (out / f"{name}.ipynb").is_file() and (out / f"ran_{name}").is_file()
    stdout = capsys.readouterr().out
    assert "[4/4] 05_results_table" in stdout.replace("\r", "\n")       # progress bars
    assert f"results table: {out / 'results' / 'results.md'}" in stdout


def test_unknown_parameter_is_refused_before_running(tmp_path, fake_notebooks):
    params = _params_dir(tmp_path, NOTEBOOKS)
    (params / "01_memory_estimation.yaml").write_text("x: 1\nbatchsize: 3\n")
    with pytest.raises(PipelineError, match=r"01_memory_estimation.yaml: unknown parameter\(s\) "
                                            r"batchsize"):
        pipeline.run(params, out=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs" / "01_memory_estimation.ipynb").exists()


def test_params_yaml_must_be_a_mapping(tmp_path):
    f = tmp_path / "01_memory_estimation.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(PipelineError, match="must be a mapping"):
        pipeline.load_params(f)


def test_ensure_phantom_writes_only_into_a_missing_or_empty_folder(tmp_path):
    root = tmp_path / "phantom"
    assert "phantom written, 1 cases" in pipeline.ensure_phantom(root, 1, 0, (16, 16, 8),
                                                                 progress=False)
    assert sorted(p.name for p in root.glob("*.nii.gz")) == ["segmentation-0.nii.gz",
                                                              "volume-0.nii.gz"]
    before = {p: p.stat().st_mtime_ns for p in root.iterdir()}
    msg = pipeline.ensure_phantom(root, 1, 0, (16, 16, 8), progress=False)
    assert msg.endswith("using the phantom there (1 cases, seed 0, shape 16 16 8)")
    # other arguments (e.g. 16 cases asked of an 8-case folder): an error naming both, never
    # another dataset silently, never rewritten
    with pytest.raises(ValueError, match=r"1 cases, seed 0, shape 16 16 8 .*asks for 3 cases"):
        pipeline.ensure_phantom(root, 3, 1, (16, 16, 8), progress=False)
    assert {p: p.stat().st_mtime_ns for p in root.iterdir()} == before
    lits = tmp_path / "lits"
    lits.mkdir()
    (lits / "volume-0.nii").write_bytes(b"not ours")
    assert "not a phantom: left untouched" in pipeline.ensure_phantom(lits, 2, progress=False)
    assert [p.name for p in lits.iterdir()] == ["volume-0.nii"]


def test_notebook_setup_moves_to_the_params_folder_and_asks_for_devices(tmp_path, monkeypatch):
    (tmp_path / "params").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")             # where JupyterLab starts the kernel
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_a=1 --xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "")
    from hrseg.runtime import devices
    monkeypatch.setattr(devices, "accelerators", lambda environ=None: [])   # a CPU-only machine
    monkeypatch.setattr(devices, "_backends_started", lambda: False)        # a fresh kernel
    assert pipeline.notebook_setup(8) == tmp_path
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_a=1 --xla_force_host_platform_device_count=8"
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert pipeline.notebook_setup() == tmp_path          # already there: stays (papermill's case)
    (tmp_path / "params" / "smoke").mkdir()
    monkeypatch.chdir(tmp_path / "params" / "smoke")
    assert pipeline.notebook_setup() == tmp_path / "params" / "smoke"   # no params/ above: stays


def _timed_notebooks(nbdir, fail=None, sleep=0.0):
    """Notebooks that write their start and end times; ``fail`` raises in its second cell."""
    for name in NOTEBOOKS:
        body = [f"import time, pathlib\nt0 = time.time()\ntime.sleep({sleep})",
                (f"pathlib.Path(out_dir, 'ran_{name}_' + str(x)).write_text("
                 "f'{t0} {time.time()}')")]
        if name == fail:
            body[1] = "raise ValueError(f'boom {x}')"
        _notebook(nbdir / f"{name}.ipynb", *body, params="x = 0\nout_dir = 'runs'")


def _interval(out, name, x):
    return tuple(float(t) for t in (out / f"ran_{name}_{x}").read_text().split())


def test_jobs_run_notebooks_side_by_side_and_the_table_after_all(tmp_path, fake_notebooks,
                                                                  capsys):
    _timed_notebooks(fake_notebooks, sleep=4.0)   # kernels start a few seconds apart
    params = _params_dir(tmp_path, ["05_results_table"])
    for x in (1, 2):
        (params / f"04_train_{x}.yaml").write_text(f"x: {x}\n")
    out = tmp_path / "runs"
    rc = cli.main(["run", "--params-dir", str(params), "--out", str(out), "--jobs", "2",
                   "--only", "04", "05"])
    assert rc == 0, capsys.readouterr().err
    a, b = _interval(out, "04_train", 1), _interval(out, "04_train", 2)
    assert a[0] < b[1] and b[0] < a[1]                      # the two 04 runs overlapped
    table = _interval(out, "05_results_table", 1)
    assert table[0] > max(a[1], b[1])                       # the table waited for both
    stdout = capsys.readouterr().out
    assert "[3/3] 05_results_table done in" in stdout
    assert (out / "04_train_2.ipynb").is_file() and (out / "04_train_2.log").is_file()


def test_jobs_failure_is_one_line_and_stops_what_follows(tmp_path, fake_notebooks, capsys):
    _timed_notebooks(fake_notebooks, fail="03_augmentation")
    params = _params_dir(tmp_path, ["03_augmentation", "05_results_table"])
    out = tmp_path / "runs"
    rc = cli.main(["run", "--params-dir", str(params), "--out", str(out), "--jobs", "2",
                   "--quiet", "--only", "03", "05"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("hrseg run: error: 03_augmentation failed in cell In [4]") and "boom 1" \
        in err[0], err
    assert not (out / "ran_05_results_table_1").exists()
    with pytest.raises(PipelineError, match="--jobs must be >= 1"):
        pipeline.run(params, out=out, jobs=0)


def test_concurrent_ensure_phantom_writes_it_once(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from hrseg.data import phantom
    calls = []

    def slow_write(root, **kw):
        calls.append(root)
        import time
        time.sleep(0.3)
        root.mkdir(parents=True)
        for f in phantom.case_files(2):
            (root / f).write_bytes(b"")
        (root / phantom.MANIFEST).write_text(json.dumps(
            {**phantom.request(2, 0, None), "files": phantom.case_files(2), "complete": True}))

    monkeypatch.setattr(phantom, "write_dataset", slow_write)
    with ThreadPoolExecutor(2) as pool:
        said = list(pool.map(lambda _: pipeline.ensure_phantom(tmp_path / "ph", 2), range(2)))
    assert len(calls) == 1
    assert sorted(s.split(":")[1].strip().split(",")[0] for s in said) == [
        "phantom written", "using the phantom there (2 cases"]
