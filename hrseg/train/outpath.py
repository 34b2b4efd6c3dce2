"""Where ``hrseg predict`` may write: checked before any inference, so a bad ``-o`` costs one
line and never a user's file.

``-o`` is a ``.nii`` / ``.nii.gz`` file path (its folder must exist or be creatable) or an
existing folder (``<folder>/<case>_pred.nii.gz``); never the input volume itself (compared by
resolved path and by inode), never a folder or other non-file under a NIfTI name. Anything
else (``/tmp/p``, ``p.img``) is refused: NIfTI writers pick the format by suffix, so another
name would not hold what it says.
"""
from __future__ import annotations

import os
from pathlib import Path


def case_stem(volume: str | Path) -> str:
    """``volume-3`` of ``volume-3.nii.gz``."""
    name = Path(volume).name
    return name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") \
        else Path(name).stem


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def prediction_target(volume: str | Path, out: str | Path, default: Path) -> Path:
    """The file a prediction of ``volume`` goes to for ``-o out`` (None: ``default``);
    ValueError (one line naming ``-o``) when ``out`` is not a place to write it."""
    volume = Path(volume)
    if not volume.is_file():
        raise ValueError(f"{volume}: no such file")
    if out is None or str(out) == "":
        target = default
    else:
        out = Path(out)
        if out.is_dir():
            target = out / f"{case_stem(volume)}_pred.nii.gz"
        elif not (out.name.endswith(".nii") or out.name.endswith(".nii.gz")) \
                or out.name in (".nii", ".nii.gz"):
            raise ValueError(f"-o {out}: give a .nii or .nii.gz file, or an existing folder "
                             f"(the prediction is then <folder>/{case_stem(volume)}_pred.nii.gz)")
        else:
            target = out
    if target.exists() and not target.is_file():
        raise ValueError(f"-o {target}: exists and is not a file")
    parent = next((p for p in (target.parent, *target.parent.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"-o {target}: {parent} is a file, not a folder")
    if _same_file(target, volume):
        raise ValueError(f"-o {target}: that is the input volume; the prediction never "
                         f"replaces it: give another file name")
    if parent is not None and not os.access(parent, os.W_OK):
        raise ValueError(f"-o {target}: cannot write into {parent} (permission denied)")
    return target
