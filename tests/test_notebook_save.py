"""A JupyterLab save of a notebook changes only what the user changed: notebooks/jupytext.toml
filters the .py, hrseg.workbench.notebook_save's pre-save hook the .ipynb. The save goes through
jupytext's contents manager, as in JupyterLab, with the hook the venv's Jupyter config names."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from hrseg.workbench import notebook_save

ROOT = Path(__file__).resolve().parent.parent
NB = "03_augmentation"
# what JupyterLab 4 adds to a notebook it saves
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3", "version": "3.11.0"}
LAB_CELL = {"editable": True, "deletable": True, "slideshow": {"slide_type": ""}}


@pytest.fixture
def pair(tmp_path):
    for name in (f"{NB}.ipynb", f"{NB}.py", "jupytext.toml"):
        shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    return tmp_path


def _as_lab_sends_it(nb):
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    for c in nb.cells:
        c.metadata.update(json.loads(json.dumps(LAB_CELL)))
    return nb


def _lab_save(folder: Path, edit=None, hook=True):
    """Open and save the notebook through jupytext's contents manager, as JupyterLab does."""
    from jupyter_server.services.contents.filemanager import FileContentsManager
    from jupytext.sync_contentsmanager import build_sync_jupytext_contents_manager_class
    config = json.loads((ROOT / "jupyter-config/jupyter_server_config.d/hrseg.json").read_text())
    from traitlets.config import Config
    cm = build_sync_jupytext_contents_manager_class(FileContentsManager)(
        root_dir=str(folder), config=Config(config if hook else {}))
    nb = _as_lab_sends_it(cm.get(f"{NB}.ipynb")["content"])
    if edit:
        edit(nb)
    cm.save({"type": "notebook", "content": nb}, f"{NB}.ipynb")


def test_a_save_without_edits_changes_neither_file(pair):
    before = {p: (pair / p).read_text() for p in (f"{NB}.ipynb", f"{NB}.py")}
    _lab_save(pair)
    for name, text in before.items():
        assert (pair / name).read_text() == text, f"{name} changed by a save without edits"


def test_a_save_with_one_edit_changes_that_line_only(pair):
    before = (pair / f"{NB}.py").read_text().splitlines()
    _lab_save(pair, edit=lambda nb: setattr(nb.cells[1], "source",
                                            nb.cells[1].source.replace("draws = 16", "draws = 8")))
    after = (pair / f"{NB}.py").read_text().splitlines()
    assert [(a, b) for a, b in zip(before, after) if a != b] == [
        (next(x for x in before if x.startswith("draws = 16")),
         next(x for x in after if x.startswith("draws = 8")))]
    assert len(after) == len(before)
    nb = nbformat.read(pair / f"{NB}.ipynb", as_version=4)
    assert "language_info" not in nb.metadata and all(
        not set(LAB_CELL) & set(c.metadata) for c in nb.cells)
    assert nb.cells[1].metadata["tags"] == ["parameters"]


def test_without_the_hook_lab_metadata_reaches_the_ipynb_not_the_py(pair):
    """What the hook is for; and the .py stays clean by jupytext.toml alone."""
    _lab_save(pair, hook=False)
    nb = nbformat.read(pair / f"{NB}.ipynb", as_version=4)
    assert nb.metadata["language_info"] == LANGUAGE_INFO
    assert "editable=true" not in (pair / f"{NB}.py").read_text()


def test_jupytext_sync_drops_cell_metadata_from_the_py(pair):
    """A notebook saved elsewhere with JupyterLab's cell metadata, then synced by hand."""
    nb = _as_lab_sends_it(nbformat.read(pair / f"{NB}.ipynb", as_version=4))
    nbformat.write(nb, pair / f"{NB}.ipynb")
    (pair / f"{NB}.ipynb").touch()
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(pair / f"{NB}.ipynb")],
                   check=True, capture_output=True)
    text = (pair / f"{NB}.py").read_text()
    assert text == (ROOT / "notebooks" / f"{NB}.py").read_text()
    for word in ("editable", "deletable", "slideshow", "language_info"):
        assert word not in text


def test_clean_keeps_what_the_user_chose():
    nb = {"metadata": {"language_info": {}, "kernelspec": {"name": "python3"}},
          "cells": [{"metadata": {"editable": False, "deletable": True, "tags": ["parameters"],
                                  "slideshow": {"slide_type": "slide"}}}]}
    notebook_save.clean(nb)
    assert nb == {"metadata": {"kernelspec": {"name": "python3"}},
                  "cells": [{"metadata": {"editable": False, "tags": ["parameters"],
                                          "slideshow": {"slide_type": "slide"}}}]}
    model = {"type": "file", "content": "editable"}
    notebook_save.pre_save(model, "x.txt")
    assert model == {"type": "file", "content": "editable"}


@pytest.mark.parametrize("name", ["01_memory_estimation", "03_augmentation", "05_results_table"])
def test_each_notebook_names_its_percent_pairing(name):
    """The Jupytext menu reads the pairing from the notebook's own metadata."""
    for suffix in (".ipynb", ".py"):
        nb = jupytext.read(ROOT / "notebooks" / f"{name}{suffix}")
        assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent", suffix


def test_the_venv_jupyter_config_names_the_hook():
    config = json.loads((ROOT / "jupyter-config/jupyter_server_config.d/hrseg.json").read_text())
    assert config["ContentsManager"]["pre_save_hook"] == \
        f"{notebook_save.__name__}.{notebook_save.pre_save.__name__}"
    assert "jupyter-config/jupyter_server_config.d/hrseg.json" in (ROOT / "pyproject.toml").read_text()
