"""napari plugin (npe2): a reader for LiTS/MSD NIfTI cases and a "Synthesize tumours" widget.

The manifest is ``napari.yaml`` next to this file (entry point ``napari.manifest`` in
pyproject.toml). Nothing here imports napari or Qt at import time; ``hrseg view`` and the
manifest's commands load the submodules on demand. File conventions: :mod:`hrseg.viz.napari._case`.
"""
