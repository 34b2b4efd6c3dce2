"""The five notebooks: stored clean, parameterised from params/, and executed end to end.

The execution test runs the whole pipeline once with params/smoke (tiny sizes; phantom data and
training runs go under a temporary folder) — the same code path as `make run`.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from hrseg import pipeline
from hrseg.pipeline import NOTEBOOKS

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs_and_has_one_parameters_cell(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), \
        f"{name}.ipynb has outputs: strip them (python notebooks/build_notebooks.py)"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert nb.metadata["kernelspec"]["name"] == pipeline.KERNEL
    assert max(len(c.source.splitlines()) for c in code) <= 25, "keep cells small"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter(name):
    """papermill silently drops a parameter line it cannot parse (e.g. '=' in its comment)."""
    import papermill as pm
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = re.findall(r"^(\w+)\s*=", cell.source, flags=re.MULTILINE)
    assert list(pm.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))) == assigned
    assert assigned[-1] == "out_dir"          # the pipeline sets it for every notebook


def test_notebooks_match_their_generator():
    r = subprocess.run([sys.executable, str(NB_DIR / "build_notebooks.py"), "--check"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("params_dir", ["params/default", "params/smoke"])
def test_every_notebook_has_valid_params(params_dir):
    runs = pipeline.discover(ROOT / params_dir)
    assert {r.notebook for r in runs} == set(NOTEBOOKS)
    for r in runs:
        params = pipeline.load_params(r.params_file)
        pipeline.check_params(NB_DIR / f"{r.notebook}.ipynb", {**params, "out_dir": "x"},
                              r.params_file)
        for key, value in params.items():     # config paths named in params must exist
            if isinstance(value, str) and value.endswith(".yaml"):
                assert (ROOT / value).is_file(), f"{r.params_file}: {key}: {value} not found"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Every notebook executed once with params/smoke, outputs in a temporary runs/."""
    out = tmp_path_factory.mktemp("runs")
    try:
        pipeline.run(ROOT / "params/smoke", out=out, progress=False,
                     extra={"data_root": str(out / "data" / "phantom"),
                            "cache_dir": str(out / "data" / "cache")})
    except pipeline.PipelineError as e:
        pytest.fail(str(e), pytrace=False)
    return out


def _outputs_text(path) -> str:
    nb = nbformat.read(path, as_version=4)
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") + json.dumps(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(parts)


def test_02_halo_correctness_smoke(smoke_run):
    text = _outputs_text(smoke_run / "02_halo_correctness.ipynb")
    assert "float32 rounding" in text and "no all-gather" in text
    fig = smoke_run / "02_halo_correctness"
    assert (fig / "halo_blocks.png").stat().st_size > 10_000
    assert (fig / "max_errors.csv").read_text().count("\n") == 1 + 2   # header + 2 meshes


def test_03_augmentation_smoke(smoke_run):
    text = _outputs_text(smoke_run / "03_augmentation.ipynb")
    assert "napari skipped" in text
    fig = smoke_run / "03_augmentation"
    for name in ("case", "synthesis_difference", "synthesis_montage", "synthesis_stats",
                 "flips"):
        assert (fig / f"{name}.png").stat().st_size > 5_000, name
    stats = (fig / "synthesis_stats.csv").read_text().splitlines()
    assert stats[1].startswith("original,") and len(stats) == 1 + 1 + 4   # 4 draws
    assert (smoke_run / "data" / "phantom" / "phantom.json").is_file()  # written by 03
    nb = nbformat.read(smoke_run / "03_augmentation.ipynb", as_version=4)
    last = nb.cells[-1].outputs[-1]["data"]
    assert "image/png" in last      # the slice viewer's static picture in an executed notebook


def test_04_train_smoke(smoke_run):
    run = smoke_run / "smoke"          # train.name of params/smoke/train_smoke.yaml
    assert (run / "result.json").is_file() and list((run / "checkpoints").glob("eval_*.json"))
    assert (run / "curves.png").stat().st_size > 5_000
    assert list(run.glob("validation_*.png")) and list((run / "predictions").glob("*.nii.gz"))


def test_05_results_table_smoke(smoke_run):
    table = pipeline.results_table(smoke_run)
    assert table == smoke_run / "results" / "results.md"
    assert "| 16³ |" in table.read_text()
    for name in ("results.csv", "results.png", "dice_vs_resolution.png",
                 "memory_vs_resolution.png"):
        assert (table.parent / name).stat().st_size > 100, name


def test_outputs_stay_under_out(smoke_run):
    """Executed notebooks, figures and tables land in the --out folder only."""
    names = {p.name for p in smoke_run.iterdir()}
    assert {f"{n}.ipynb" for n in NOTEBOOKS} <= names
    in_notebooks = {p.name for p in NB_DIR.iterdir() if not p.name.startswith((".", "__"))}
    assert in_notebooks == {f"{n}.ipynb" for n in NOTEBOOKS} | {"build_notebooks.py"}
