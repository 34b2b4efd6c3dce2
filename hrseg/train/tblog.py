"""TensorBoard event files beside ``metrics.jsonl``: ``tensorboard --logdir runs`` shows a run.

The training loop hands each ``metrics.jsonl`` record here as well; ``metrics.jsonl`` stays the
source the notebooks and tests read, the event files are a view of it for TensorBoard:

    train/loss, train/grad_norm, train/lr, train/loss_scale      every step
    train/dice_liver, train/dice_tumour                          every step (the batch's Dice)
    time/step_s, time/data_s, time/voxels_per_s                  every step
    eval/<key>                                                   every evaluation (Dice figures)
    validation/<case id>                                         every evaluation: an image

A validation image is the axial slice with the most label of a case (hrseg.viz.figures's
display orientation), three panels side by side: CT | CT + label | CT + prediction (liver
green, tumour red), for the first :data:`MAX_CASES` validation cases.

The files are written into the run directory itself (``events.out.tfevents.*``), so each run
shows under its own name; TensorBoard reads them in name order, which is the order they were
opened in. A resumed run writes a new file that starts with a purge marker at
the restored step: TensorBoard drops the older file's points from that step on, as
``metrics.jsonl`` does. Only the main process writes (``enabled``); the others do nothing.

Events are written in this thread (tensorboardX's EventsWriter, not its SummaryWriter's
background thread and exit hook), so a failed write is the end of the event file, never a
traceback or a failed run: the events are a view, ``metrics.jsonl`` and the checkpoints are
what a run needs. It costs one ``hrseg: TensorBoard: ...`` line, except on a full disk, which
the run reports itself in its one error line when it next writes a checkpoint.
"""
from __future__ import annotations

import errno
import math
import sys
import time
from pathlib import Path

import numpy as np

from hrseg.viz.figures import render_slice

# metrics.jsonl key -> TensorBoard tag
SCALARS = {
    "loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
    "loss_scale": "train/loss_scale", "dice_liver": "train/dice_liver",
    "dice_tumour": "train/dice_tumour", "step_time_s": "time/step_s",
    "data_time_s": "time/data_s", "voxels_per_s": "time/voxels_per_s",
}
MAX_CASES = 3          # validation cases drawn at each evaluation
FLUSH_SECS = 10        # a live `tensorboard` sees a running run within this many seconds


def _number(v) -> float | None:
    """A finite float of a metric value, else None (n/a: no point is drawn)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def best_slice(label: np.ndarray) -> int:
    """The axial index with the most labelled voxels (the middle one when there are none)."""
    lab = np.asarray(label)
    area = (lab > 0).sum(axis=(0, 1))                    # (Z,)
    return int(np.argmax(area)) if area.max() > 0 else lab.shape[2] // 2


def panels(image: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """``(H, 3W, 3)`` uint8: CT | CT + label | CT + prediction at :func:`best_slice` of an
    ``(X, Y, Z)`` image in [0, 1] (full-range grey) with its label and predicted label."""
    z = best_slice(label)
    kw = {"axis": 2, "index": z, "window": 1.0, "level": 0.5, "show_prediction": False}
    return np.concatenate([render_slice(image, **kw),
                           render_slice(image, label, **kw),
                           render_slice(image, prediction, **kw)], axis=1)


class TensorBoard:
    """The event writer of one training invocation (``start``: the step it starts from)."""

    def __init__(self, run_dir: str | Path, start: int, enabled: bool):
        self.writer = None
        self._next_flush = time.monotonic() + FLUSH_SECS
        if enabled:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2
            self._pb = event_pb2
            # tensorboardX names a file by the second it was opened: the nanoseconds keep two
            # starts within a second apart, in order
            self._guard(lambda: setattr(self, "writer", EventsWriter(
                str(Path(run_dir) / "events"), f".{time.time_ns() % 10 ** 9:09d}")))
            if start:   # TensorBoard drops the earlier files' points from the restored step on
                self._write(step=int(start), session_log=event_pb2.SessionLog(
                    status=event_pb2.SessionLog.START))

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as e:   # a full disk is the run's own one line (its checkpoints)
            if e.errno != errno.ENOSPC:
                print(f"hrseg: TensorBoard: events not written from here on ({e}); "
                      f"metrics.jsonl has every number", file=sys.stderr)
            writer, self.writer = self.writer, None
            if writer is not None:
                try:
                    writer.close()
                except OSError:
                    pass

    def _write(self, **fields) -> None:
        if self.writer is not None:
            event = self._pb.Event(wall_time=time.time(), **fields)
            self._guard(lambda: self.writer.write_event(event))

    def _flush(self, now: bool = False) -> None:
        if self.writer is not None and (now or time.monotonic() >= self._next_flush):
            self._next_flush = time.monotonic() + FLUSH_SECS
            self._guard(self.writer.flush)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX import summary
        self._write(step=step, summary=summary.scalar(tag, value))

    def step(self, record: dict) -> None:
        """One training step's ``metrics.jsonl`` record."""
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            v = _number(record.get(key))
            if v is not None:
                self._scalar(tag, v, int(record["step"]))
        self._flush()

    def evaluation(self, step: int, result: dict | None) -> None:
        """An evaluation (inference.Evaluator's dict): its Dice figures; NaN (no tumour in the
        validation cases) is left out, not drawn as 0."""
        if self.writer is None or not result:
            return
        for key, value in result.items():
            v = _number(value)
            if v is not None and key != "step":
                self._scalar(f"eval/{key}", v, int(step))
        self._flush(now=True)

    def predictions(self, step: int, cases, preds) -> None:
        """Images of the first validation cases (``cases[i].image``, ``.label``, ``.id``) and
        their predicted labels ``preds[i]`` (X, Y, Z)."""
        if self.writer is None:
            return
        from tensorboardX import summary
        for case, pred in list(zip(cases, preds))[:MAX_CASES]:
            rgb = panels(np.asarray(case.image), np.asarray(case.label), np.asarray(pred))
            self._write(step=int(step), summary=summary.image(
                f"validation/{case.id}", rgb, dataformats="HWC"))
        self._flush(now=True)

    def close(self) -> None:
        if self.writer is not None:
            self._guard(self.writer.close)
            self.writer = None
