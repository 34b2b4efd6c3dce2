"""npe2 reader: a NIfTI file or a LiTS/MSD dataset folder -> CT image + labels + prediction."""
from __future__ import annotations

from pathlib import Path

from hrseg.viz.napari._case import case_layers, find_case, is_nifti


def get_reader(path):
    """Return :func:`read` when ``path`` (or every path of a list) is a NIfTI file or a folder
    holding a case; None otherwise so napari can try another reader."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    for p in paths:
        p = Path(p)
        if p.is_dir():
            try:
                find_case(p)
            except (FileNotFoundError, ValueError):
                return None
        elif not is_nifti(p):
            return None
    return read


def read(path) -> list[tuple]:
    """LayerData tuples for each path (see :func:`hrseg.viz.napari._case.case_layers`)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    layers = []
    for p in paths:
        layers.extend(case_layers(find_case(p)))
    return layers
