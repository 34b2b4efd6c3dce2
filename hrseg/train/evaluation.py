"""A trained run, used: load its checkpoint, evaluate it, segment a new volume with it.

``load_run`` rebuilds the run's model on this machine's devices; ``evaluate`` writes
``checkpoints/eval_<step>.json``; ``predict`` writes labels on the input's own voxel grid.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from hrseg import atomic, config, data
from hrseg.data import nifti
from hrseg.train import checkpoint, distributed, inference, outpath, rundir
from hrseg.train.loop import _say, build, make_layout


def load_run(run_dir: str | Path, step_no: int | None = None):
    """``(cfg, graphdef, state, layout, step)`` of a run directory's checkpoint (default: the
    newest intact one; a damaged newer one is reported in one line and skipped).

    The run's mesh is used when this machine has its devices; otherwise one device (backend
    "none"): a run trained on a pod can be evaluated on a laptop. Read-only: no lock.
    """
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir)
    if cfg.mesh.data * math.prod(cfg.mesh.spatial) > jax.device_count():
        cfg = dataclasses.replace(
            cfg, mesh=dataclasses.replace(cfg.mesh, backend="none", spatial=(1, 1, 1), data=1),
            runtime=dataclasses.replace(cfg.runtime, distributed=False))
    layout = make_layout(cfg)
    graphdef, state, _ = build(cfg, layout)
    ckpts = checkpoint.Checkpoints(rundir.checkpoints(run_dir), read_only=True)
    try:
        if step_no is not None:
            state = ckpts.restore(state, step_no)
        else:
            found = ckpts.restore_intact(state, warn=_say)
            if found is None:
                raise FileNotFoundError(f"{run_dir}: no checkpoint in {ckpts.directory}")
            state, step_no = found
    finally:
        ckpts.close()
    return cfg, graphdef, state, layout, step_no


def evaluate(run_dir: str | Path, step: int | None = None) -> dict:
    """Validation Dice of a run's checkpoint, and its lesions one by one on each case's
    original grid (``metrics["lesions"]``, inference.LesionScorer), written to
    ``checkpoints/eval_<step>.json``."""
    cfg, graphdef, state, layout, step_no = load_run(run_dir, step)
    dataset = data.load_dataset(cfg.data)
    result = inference.Evaluator(cfg, graphdef, layout, dataset.val)(state, step_no)
    if distributed.is_main():
        path = rundir.eval_path(run_dir, step_no)
        try:
            atomic.write_json(path, {"step": step_no, "config": config.to_dict(cfg),
                                     "metrics": result})
        except OSError as e:             # a read-only run folder, a full disk
            why = str(e) if isinstance(e, atomic.DiskFull) else (
                f"the result could not be saved to {path} ({e.strerror or e})")
            raise NotSaved(result, why) from None
    return result


class NotSaved(OSError):
    """The evaluation was computed (``.result``) but could not be written."""

    def __init__(self, result: dict, message: str):
        super().__init__(message)
        self.result = result

    def __str__(self) -> str:
        return str(self.args[0])


def prediction_path(run_dir: str | Path, volume: str | Path) -> Path:
    """``<run>/predictions/prediction-N.nii.gz`` for LiTS ``volume-N``,
    ``prediction_XXXXX.nii.gz`` for KiTS19 ``case_XXXXX/imaging.nii.gz`` (the challenge's
    submission names), else the same name."""
    stem = outpath.case_stem(volume)
    if stem.startswith("volume-"):
        stem = "prediction-" + stem[len("volume-"):]
    case = Path(volume).parent.name
    if stem == "imaging" and case.startswith("case_"):
        stem = "prediction_" + case[len("case_"):]
    return rundir.predictions(run_dir) / f"{stem}.nii.gz"


def predict(run_dir: str | Path, volume: str | Path, out: str | Path | None = None,
            clean_nonfinite: bool = False) -> Path:
    """Segment a NIfTI CT volume with a run's newest checkpoint; the labels are resampled
    back to the input's voxel grid and written with its affine, so they overlay the original
    in any viewer. ``out`` defaults to :func:`prediction_path`. A volume with NaN/Inf voxels
    is refused (ValueError naming the file and the count) unless ``clean_nonfinite``: then
    NaN and -Inf become the HU window's low end (air), +Inf its high end."""
    import nibabel as nib

    out = outpath.prediction_target(volume, out, prediction_path(run_dir, volume))
    hu, _, spacing = data.read_nifti(volume)                  # canonical RAS+
    bad = int(np.size(hu) - np.count_nonzero(np.isfinite(hu)))
    if bad and not clean_nonfinite:
        raise ValueError(f"{volume}: {bad} NaN/Inf voxels; clean the file, or pass "
                         f"--clean-nonfinite to set them to the HU window's ends")
    if bad:
        lo, hi = rundir.read_config(run_dir).data.hu_window
        hu = np.nan_to_num(np.asarray(hu, np.float32), nan=lo, neginf=lo, posinf=hi)
    cfg, graphdef, state, layout, _ = load_run(run_dir)
    image = data.preprocess(hu, spacing, cfg.data)
    [labels] = inference.Predictor(cfg, graphdef, layout)(state, [image])
    meta = {"grid": data.grid_for(hu.shape, spacing, cfg.data).to_dict(),
            "affine": nib.load(str(volume)).affine}             # the file's own orientation
    labels, affine = data.to_original_geometry(labels, meta)
    return nifti.write_nifti(out, labels, affine, dtype=np.uint8)
