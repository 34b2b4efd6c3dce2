"""The notebooks: stored clean, paired with their text files, parameterised, executed end to end.

Every numbered ``notebooks/NN_name.ipynb`` (hrseg.workbench.pipeline.notebook_names) is paired by jupytext
(notebooks/jupytext.toml) with ``NN_name.py`` in the percent format; both are committed, the
.ipynb without outputs. The execution test runs the whole pipeline once with params/notebooks/smoke (tiny
sizes; phantom data and training runs go under a temporary folder) — the same code path as
`make run`.
"""
import json
import re
import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

from hrseg.workbench import pipeline

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = pipeline.notebook_names()
SYNC = "jupytext --sync notebooks/*.ipynb"


def stored_problems(path: Path) -> list[str]:
    """What nbstripout would remove from a committed notebook: outputs, execution counts."""
    nb = nbformat.read(path, as_version=4)
    return [f"{path.name} cell {i}: {what} (strip it: nbstripout {path.relative_to(path.parent.parent)})"
            for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for what, bad in (("outputs", c.outputs), ("execution count", c.execution_count))
            if bad]


def _cells(nb) -> list[tuple]:
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


def pairing_differences(ipynb: Path, text: Path) -> list[str]:
    """Cells (type, source, tags) that differ between a notebook and its paired text file, both
    read by jupytext."""
    if not text.is_file():
        return [f"{text.name} is missing (pair it: {SYNC})"]
    a, b = _cells(jupytext.read(ipynb)), _cells(jupytext.read(text))
    out = [f"cell {i}: {ipynb.name} has {x!r}, {text.name} has {y!r}"
           for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b):
        out.append(f"{ipynb.name} has {len(a)} cells, {text.name} {len(b)}")
    return out


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    assert stored_problems(NB_DIR / f"{name}.ipynb") == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_and_its_text_file_are_in_sync(name):
    diff = pairing_differences(NB_DIR / f"{name}.ipynb", NB_DIR / f"{name}.py")
    assert diff == [], f"{name}: out of sync, run {SYNC}:\n" + "\n".join(diff[:5])


def test_the_checks_find_outputs_and_drift(tmp_path):
    name = NOTEBOOKS[0]
    for suffix in (".ipynb", ".py"):
        shutil.copy(NB_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    ipynb, text = tmp_path / f"{name}.ipynb", tmp_path / f"{name}.py"
    nb = nbformat.read(ipynb, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.execution_count = 3
    code.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    nbformat.write(nb, ipynb)
    assert [p.split(": ")[1].split(" (")[0] for p in stored_problems(ipynb)] == [
        "outputs", "execution count"]
    assert pairing_differences(ipynb, text) == []          # outputs are not part of the pair
    text.write_text(text.read_text().replace('# %% tags=["parameters"]', "# %%"))
    untagged = pairing_differences(ipynb, text)      # papermill would not find the cell
    assert len(untagged) == 1 and "['parameters']" in untagged[0]
    text.write_text(text.read_text().replace('out_dir = "runs"', 'out_dir = "elsewhere"'))
    assert "elsewhere" in pairing_differences(ipynb, text)[0]
    text.unlink()
    assert "missing" in pairing_differences(ipynb, text)[0]


def test_the_notebooks_folder_holds_pairs_and_the_pairing_config():
    files = {p.name for p in NB_DIR.iterdir() if not p.name.startswith((".", "__"))}
    pairs = {f"{n}{s}" for n in NOTEBOOKS for s in (".ipynb", ".py")}
    assert files == pairs | {"jupytext.toml"}, "every notebook NN_name.ipynb has NN_name.py"
    config = (NB_DIR / "jupytext.toml").read_text()
    assert re.search(r'^formats = "ipynb,py:percent"', config, re.MULTILINE)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_one_parameters_cell_and_small_cells(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert nb.metadata["kernelspec"]["name"] == pipeline.KERNEL
    code = [c for c in nb.cells if c.cell_type == "code" and c is not tagged[0]]
    longest = max(code, key=lambda c: len(c.source.splitlines()))
    assert len(longest.source.splitlines()) <= 15, \
        f"keep cells small, move code into hrseg: {longest.source[:200]}"
    defs = [c.source for c in code if re.search(r"^(def|class) ", c.source, re.MULTILINE)]
    assert not defs, f"functions belong in the package, not in {name}: {defs[0][:80]}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter(name):
    """papermill silently drops a parameter line it cannot parse (e.g. '=' in its comment)."""
    import papermill as pm
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = re.findall(r"^(\w+)\s*=", cell.source, flags=re.MULTILINE)
    assert list(pm.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))) == assigned
    assert assigned[-1] == "out_dir"          # the pipeline sets it for every notebook


@pytest.mark.parametrize("params_dir", ["params/notebooks/default", "params/notebooks/smoke"])
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
    """Every notebook executed once with params/notebooks/smoke, outputs in a temporary runs/."""
    out = tmp_path_factory.mktemp("runs")
    try:
        pipeline.run(ROOT / "params/notebooks/smoke", out=out, progress=False,
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
    run = smoke_run / "smoke"          # train.name of params/train/smoke/train_smoke.yaml
    assert (run / "result.json").is_file() and list((run / "checkpoints").glob("eval_*.json"))
    assert (run / "curves.png").stat().st_size > 5_000
    assert list(run.glob("validation_*.png")) and list((run / "predictions").glob("*.nii.gz"))


def test_05_results_table_smoke(smoke_run):
    table = pipeline.results_table(smoke_run)
    assert table == smoke_run / "results" / "results.md"
    assert "| 16³ |" in table.read_text()
    for name in ("results.csv", "results.png", "dice_vs_resolution.png",
                 "memory_vs_resolution.png", "lesions.md", "lesions.png"):   # 04 scored lesions
        assert (table.parent / name).stat().st_size > 100, name


def test_outputs_stay_under_out(smoke_run):
    """Executed notebooks, figures and tables land in the --out folder only."""
    names = {p.name for p in smoke_run.iterdir()}
    assert {f"{n}.ipynb" for n in NOTEBOOKS} <= names
    in_notebooks = {p.name for p in NB_DIR.iterdir() if not p.name.startswith((".", "__"))}
    assert in_notebooks == {f"{n}{s}" for n in NOTEBOOKS for s in (".ipynb", ".py")} | {
        "jupytext.toml"}


# Suffixes of the input files a parameter may name (a run config, a table, a volume): such a
# path must exist. Folders (data_root, cache_dir, out_dir) are made when missing.
INPUT_SUFFIXES = (".yaml", ".yml", ".json", ".csv", ".npy", ".nii", ".nii.gz")


def parameter_defaults(ipynb: Path) -> dict:
    """The parameters cell of a notebook: ``{name: default}`` of its assignments (literals, as
    papermill requires)."""
    import ast
    nb = nbformat.read(ipynb, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)}


def missing_inputs(params: dict, root: Path) -> list[str]:
    """``name: path`` of every input file a parameter (or a string inside a list or dict of
    it) names that does not exist relative to ``root``."""
    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from strings(x)
    return [f"{name}: {s}" for name, value in params.items() for s in strings(value)
            if s.lower().endswith(INPUT_SUFFIXES) and not (root / s).exists()]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_defaults_name_files_that_exist(name):
    """Run All in JupyterLab uses the parameters cell as it stands (papermill's params replace
    it only under `hrseg run`): every input file it names is there, every config loads."""
    from hrseg import config
    params = parameter_defaults(NB_DIR / f"{name}.ipynb")
    assert params["out_dir"], name
    assert missing_inputs(params, ROOT) == [], f"{name}.ipynb's parameters cell"
    for key, value in params.items():
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and key == "config":
            config.load(ROOT / value, params.get("overrides", []))


def test_missing_inputs_finds_a_config_that_is_not_there(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "a.yaml").write_text("{}\n")
    params = {"config": "params/a.yaml", "other": {"x": ["params/gone.yaml"]},
              "data_root": "data/phantom", "overrides": ["train.steps=3"], "n": 3}
    assert missing_inputs(params, tmp_path) == ["other: params/gone.yaml"]
