"""What a JupyterLab save writes into ``notebooks/*.ipynb``: only what the user changed.

JupyterLab adds metadata to every notebook it saves that nobody asked for: the kernel's
``language_info`` (~10 lines) and, on each cell, ``editable: true``, ``deletable: true`` and
``slideshow: {slide_type: ""}`` — each the value the key means when it is absent. Jupytext's
``cell_metadata_filter`` (notebooks/jupytext.toml) keeps them out of the paired ``.py``; the
``.ipynb`` is written by Jupyter's contents manager, which runs this pre-save hook first.

The hook is registered for the venv's Jupyter server by
``jupyter-config/jupyter_server_config.d/hrseg.json`` (installed into ``<venv>/etc/jupyter`` by
``pip install -e .``); by hand: ``jupyter lab --ContentsManager.pre_save_hook=
hrseg.workbench.notebook_save.pre_save``. Metadata with any other value — a cell made
read-only, a slide type chosen — is the user's and is kept.
"""
from __future__ import annotations

# cell metadata key -> the value JupyterLab writes when the user chose nothing
CELL_DEFAULTS = {"editable": True, "deletable": True, "slideshow": {"slide_type": ""}}
NOTEBOOK_KEYS = ("language_info",)     # notebook metadata the kernel fills in on every save


def clean(nb: dict) -> dict:
    """Drop :data:`NOTEBOOK_KEYS` and every cell metadata key at its default, in place."""
    meta = nb.get("metadata", {})
    for key in NOTEBOOK_KEYS:
        meta.pop(key, None)
    for cell in nb.get("cells", []):
        cm = cell.get("metadata", {})
        for key, default in CELL_DEFAULTS.items():
            if key in cm and cm[key] == default:
                del cm[key]
    return nb


def pre_save(model: dict, path: str = "", contents_manager=None, **kwargs) -> None:
    """Jupyter server's ``ContentsManager.pre_save_hook``: clean a notebook model before it is
    written (other files pass through)."""
    if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
        clean(model["content"])
