"""Inference on the mesh, and the validation Dice of a training state.

A network trained on whole volumes predicts a whole volume in one forward pass (a 2D network
sees every slice of it). One trained on patches (``data.patch``) predicts the whole volume by
Gaussian-weighted sliding windows (sliding.py), each window a forward pass on the mesh.
Predictions come back to the host as (X, Y, Z) label volumes and are scored by hrseg.metrics
on the network grid, and lesion by lesion (hrseg.lesions) on each case's original voxel grid.
"""
from __future__ import annotations

import numpy as np

from hrseg import data, lesions, metrics
from hrseg.config import Config
from hrseg.data import buckets, resample
from hrseg.nn import unet
from hrseg.parallel import partition
from hrseg.train import distributed, sliding, step

# 2D inference: slices per device per forward pass (~1 M pixels: 256 at 64², 4 at 512²).
PIXELS_PER_DEVICE = 2 ** 20


def pad_multiple(cfg: Config) -> tuple[int, int, int]:
    """``resample: native``: each padded axis is a multiple of (devices on it) × 2^poolings.
    From the config's mesh, not the devices at hand: the same run pads the same way on any
    backend (so "none" and "halo" see the same batches), and a 1-device mesh divides it."""
    pool = 2 ** unet.poolings_of(cfg.model)
    spatial = tuple(cfg.mesh.spatial) + (1,) * (3 - len(cfg.mesh.spatial))
    return tuple(int(n) * pool for n in spatial)


class Predictor:
    """``predict(state, volumes [(X, Y, Z)]) -> [labels (X, Y, Z) int32]`` on the mesh.

    3D: as many whole volumes per forward pass as the mesh's "data" axis has replicas, or as
    many sliding windows for a patch-trained run. 2D: every axial slice, with its neighbours
    as channels, in chunks of slices. ``resample: native``: each volume is padded to its
    bucket (buckets.pad), predicted, and cropped back to its own shape.
    """

    def __init__(self, cfg: Config, graphdef, layout: partition.Layout):
        self.cfg, self.ndim = cfg, cfg.model.dims
        self.multiple = pad_multiple(cfg) if self.ndim == 3 else None
        self.layout = layout
        self.data = layout.data
        self._predict = step.make_predict(graphdef, layout, self.ndim)

    def _run(self, state, items, chunk: int) -> np.ndarray:
        """Items ``(*S, C)`` -> labels ``(N, *S)``, ``chunk`` (a multiple of the data axis) per
        forward pass; the last chunk is padded by repeating its last item."""
        out = []
        for i in range(0, len(items), chunk):
            part = [np.asarray(a, np.float32) for a in items[i:i + chunk]]
            n = len(part)
            part = np.stack(part + part[-1:] * (chunk - n))
            sharding = self.layout.sharding(partition.volume_spec(self.ndim), part.shape)
            g = distributed.global_array(sharding, part, part.shape, 0)
            labels, _ = self._predict(state.params, state.rest, g)
            out.append(distributed.to_host(labels)[:n])
        return np.concatenate(out).astype(np.int32)

    def _probs(self, state, windows: np.ndarray) -> np.ndarray:
        """Windows ``(n, px, py, pz, C)`` (n = the data axis) -> probabilities ``(n, …, K)``."""
        sharding = self.layout.sharding(partition.volume_spec(self.ndim), windows.shape)
        g = distributed.global_array(sharding, windows, windows.shape, 0)
        return distributed.to_host(self._predict(state.params, state.rest, g)[1])

    def __call__(self, state, volumes) -> list[np.ndarray]:
        if self.ndim == 3 and self.cfg.data.patch:
            return [np.argmax(sliding.sliding_window(
                lambda w: self._probs(state, w), np.asarray(v, np.float32)[..., None],
                self.cfg.data.patch, batch=self.data), -1).astype(np.int32) for v in volumes]
        if self.ndim == 3 and self.cfg.data.resample == "native":
            out = []
            for v in volumes:
                shape = buckets.bucket_shape(np.shape(v), self.multiple,
                                             self.cfg.data.buckets_per_octave)
                padded = buckets.pad_image(np.asarray(v, np.float32), shape)[..., None]
                out.append(buckets.crop(self._run(state, [padded], self.data)[0], np.shape(v)))
            return out
        if self.ndim == 3:
            labels = self._run(state, [np.asarray(v)[..., None] for v in volumes], self.data)
            return list(labels)
        out = []
        for v in volumes:
            slices = data.stack_slices(np.asarray(v, np.float32), None, self.cfg.data.slices_2d)
            per_device = max(1, PIXELS_PER_DEVICE // (slices.shape[1] * slices.shape[2]))
            # never more per device than the volume has slices: at 16² the pixel budget is
            # 4096 slices, and padding a 128-slice volume up to it made an evaluation 30× dearer
            per_device = min(per_device, -(-len(slices) // self.data))
            out.append(np.moveaxis(self._run(state, slices, self.data * per_device), 0, -1))
        return out


def _box(lo, hi) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


class LesionScorer:
    """Per-lesion scores (hrseg.lesions) of network-grid predictions on each case's original
    voxel grid: the reference label as stored (canonical orientation, its own spacing) and the
    prediction resampled back by nearest neighbour (as ``hrseg predict`` writes it). Only the
    box around the reference and predicted tumours is resampled and labelled; each case's
    reference box and its lesions are read from its label file and labelled once, and kept
    (one byte a voxel of that box while a case has < 256 lesions)."""

    def __init__(self, cases, rule: str = lesions.DEFAULT_RULE,
                 threshold: float = lesions.DICE_THRESHOLD):
        self.cases, self.rule, self.threshold = list(cases), rule, threshold
        self._refs: dict[str, tuple] = {}

    def reference(self, case) -> tuple:
        """``(grid, spacing, box or None, (lesion labels in the box, count))`` of a Volume,
        cached."""
        if case.id not in self._refs:
            path, grid = case.meta["label_path"], resample.Grid.from_dict(case.meta["grid"])
            label, _, spacing = data.read_nifti(path)
            if tuple(label.shape) != grid.in_shape:
                raise ValueError(f"{path}: shape {tuple(label.shape)} is not the "
                                 f"{grid.in_shape} the cached case was resampled from")
            mask = label == metrics.TUMOUR
            box = lesions.bbox(mask)
            comps = None
            if box is not None:
                lab, n = lesions.components(mask[_box(*box)])
                comps = (lab.astype(np.min_scalar_type(n)), n)
            self._refs[case.id] = (grid, np.asarray(spacing, np.float64), box, comps)
        return self._refs[case.id]

    def case(self, case, pred) -> dict:
        """:func:`hrseg.lesions.analyse` of one case; centres in original canonical voxels."""
        grid, spacing, ref_box, ref = self.reference(case)
        pmask = (np.asarray(pred) == metrics.TUMOUR).astype(np.uint8)     # network grid
        pred_box = lesions.bbox(pmask)
        if pred_box is not None:
            pred_box = resample.input_box(grid, *pred_box)
        boxes = [b for b in (ref_box, pred_box) if b is not None]
        if not boxes:
            return {"lesions": [], "false_positives": 0, "predicted_lesions": 0}
        lo, hi = np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)
        t_lab = np.zeros(tuple(hi - lo), ref[0].dtype if ref else np.uint8)   # union box
        if ref_box is not None:
            t_lab[_box(ref_box[0] - lo, ref_box[1] - lo)] = ref[0]
        true = t_lab > 0
        p = (resample.to_input_grid(grid, pmask, box=(lo, hi)).astype(bool)
             if pred_box is not None else np.zeros_like(true))
        return lesions.analyse(p, true, spacing, self.rule, self.threshold, origin=lo,
                               true_components=(t_lab, ref[1] if ref else 0))

    def __call__(self, preds) -> dict:
        """:func:`hrseg.lesions.summarize` of the cases plus ``per_case`` (each case's lesions,
        with its id), ``grid: "original"`` and ``bins_mm``. Deterministic (no timings): an
        evaluation repeated on the same weights writes the same JSON."""
        cases = [{"id": str(c.id), **self.case(c, p)} for c, p in zip(self.cases, preds)]
        out = lesions.summarize(cases, self.rule, self.threshold)
        return dict(out, grid="original", bins_mm=list(lesions.BINS_MM), per_case=cases)


class Evaluator:
    """Dice per case / global for liver and tumour on whole validation volumes, and (unless
    ``per_lesion=False`` in the call) the per-lesion table (:class:`LesionScorer`) under
    ``"lesions"``."""

    def __init__(self, cfg: Config, graphdef, layout: partition.Layout, cases):
        self.cfg, self.cases = cfg, list(cases)
        self.predict = Predictor(cfg, graphdef, layout)
        self.lesions = LesionScorer(self.cases)

    def __call__(self, state, step_no: int | None = None, on_predictions=None,
                 per_lesion: bool = True) -> dict:
        """``on_predictions(cases, preds)``, if given, sees the predicted label volumes."""
        if not self.cases:
            return {}
        preds = self.predict(state, [c.image for c in self.cases])
        if on_predictions is not None:
            on_predictions(self.cases, preds)
        labels = [np.asarray(c.label) for c in self.cases]
        result = metrics.evaluate_cases(preds, labels, empty=self.cfg.train.empty_dice)
        result = dict(result, case_ids=[str(c.id) for c in self.cases])
        if per_lesion:
            result["lesions"] = self.lesions(preds)
        if step_no is not None:
            result["step"] = int(step_no)
        return result


def summary_line(result: dict | None) -> str:
    """One line of an evaluation: its Dice figures (the tumour's ``n/a`` where the validation
    cases hold no tumour: metrics.shown, the convention of ``hrseg table`` too) and the
    lesions found."""
    if not result:
        return "no validation cases"
    tumour = metrics.tumour_applicable(result)
    line = ", ".join(f"{k} {metrics.shown(v, tumour or not k.startswith('tumour'))}"
                     for k, v in result.items()
                     if "dice" in k and k != "empty_dice" and (v is None or isinstance(v, float)))
    les = result.get("lesions")
    if les and les.get("reference_lesions"):
        found = sum(b["detected"] for b in les["bins"])
        line += (f"; lesions detected {found}/{les['reference_lesions']} ({les['rule']}), "
                 f"{les['false_positives_per_case']:.1f} false positive(s) per case")
    return line
