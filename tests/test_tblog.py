"""tblog.py: TensorBoard event files, read back record by record (TFRecord framing, CRCs
checked, tensorboardX's own Event protobuf), as TensorBoard would read them."""
import io
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from hrseg.train import tblog


def read_events(path: Path) -> list:
    """Every Event of one event file; a bad length or data CRC fails the test."""
    raw, events, i = Path(path).read_bytes(), [], 0
    while i < len(raw):
        header = raw[i:i + 8]
        (n,) = struct.unpack("Q", header)
        assert struct.unpack("I", raw[i + 8:i + 12])[0] == masked_crc32c(header), "length CRC"
        data = raw[i + 12:i + 12 + n]
        assert struct.unpack("I", raw[i + 12 + n:i + 16 + n])[0] == masked_crc32c(data), "CRC"
        events.append(event_pb2.Event.FromString(data))
        i += 16 + n
    return events


def read_run(run_dir: Path) -> tuple[dict, dict, list]:
    """``({tag: {step: value}}, {tag: {step: (H, W, C) image}}, purge steps)`` of every event
    file of a run directory, in name order (later points replace earlier ones)."""
    scalars, images, purges = {}, {}, []
    files = sorted(Path(run_dir).glob("events.out.tfevents.*"))    # TensorBoard's order
    for path in files:
        for e in read_events(path):
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                purges.append(e.step)
            for v in e.summary.value:
                if v.HasField("image"):
                    images.setdefault(v.tag, {})[e.step] = imread(
                        io.BytesIO(v.image.encoded_image_string), format="png")
                elif v.HasField("simple_value"):
                    scalars.setdefault(v.tag, {})[e.step] = v.simple_value
    return scalars, images, purges


def _record(step, **kw):
    return {"step": step, "loss": 1.0 / step, "grad_norm": 2.0, "dice_liver": 0.5,
            "dice_tumour": math.nan, "lr": 3e-3, "step_time_s": 0.25, "data_time_s": 0.01,
            "voxels_per_s": 1e6, **kw}


def _case(seed):
    rng = np.random.default_rng(seed)
    image = rng.random((24, 20, 10), np.float32)
    label = np.zeros((24, 20, 10), np.int32)
    label[4:16, 5:15, 6] = 1
    label[8:12, 8:12, 6] = 2
    return SimpleNamespace(id=f"c{seed}", image=image, label=label)


def test_steps_evaluations_and_images_read_back(tmp_path):
    tb = tblog.TensorBoard(tmp_path, 0, enabled=True)
    for s in (1, 2, 3):
        tb.step(_record(s))
    cases = [_case(i) for i in range(tblog.MAX_CASES + 1)]
    preds = [c.label for c in cases]
    tb.predictions(3, cases, preds)
    tb.evaluation(3, {"liver_dice_global": 0.75, "tumour_dice_global": math.nan,
                      "cases": 4, "case_ids": ["c0"], "step": 3})
    tb.close()
    scalars, images, _ = read_run(tmp_path)
    assert scalars["train/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    for tag in ("train/grad_norm", "train/lr", "train/dice_liver", "time/step_s",
                "time/data_s", "time/voxels_per_s"):
        assert sorted(scalars[tag]) == [1, 2, 3], tag
    assert scalars["train/lr"][2] == pytest.approx(3e-3)
    assert "train/dice_tumour" not in scalars            # NaN: n/a, not drawn as a point
    assert scalars["eval/liver_dice_global"] == pytest.approx({3: 0.75})
    assert "eval/tumour_dice_global" not in scalars and "eval/step" not in scalars
    assert sorted(images) == [f"validation/c{i}" for i in range(tblog.MAX_CASES)]
    img = images["validation/c0"][3]
    assert img.shape[:2] == (20, 3 * 24)                 # (Y, 3 X): three panels of a slice
    # the label panel is coloured where the label is and the CT panel is grey everywhere
    ct, lab = img[:, :24, :3], img[:, 24:48, :3]
    assert np.allclose(ct[..., 0], ct[..., 1]) and not np.allclose(lab[..., 0], lab[..., 1])


def test_panels_show_the_slice_with_the_most_label():
    c = _case(0)
    assert tblog.best_slice(c.label) == 6
    assert tblog.best_slice(np.zeros((4, 4, 9))) == 4
    rgb = tblog.panels(c.image, c.label, np.zeros_like(c.label))
    assert rgb.shape == (20, 72, 3) and rgb.dtype == np.uint8
    pred = rgb[:, 48:]                                   # an empty prediction: grey only
    assert np.array_equal(pred[..., 0], pred[..., 2])
    assert np.array_equal(rgb[:, :24], pred)             # the same grey as the CT panel


def test_a_resume_purges_the_steps_run_again(tmp_path):
    tb = tblog.TensorBoard(tmp_path, 0, enabled=True)
    for s in (1, 2, 3, 4):
        tb.step(_record(s))
    tb.close()
    tb = tblog.TensorBoard(tmp_path, 2, enabled=True)    # resumed from the step-2 checkpoint
    for s in (3, 4):
        tb.step(_record(s, loss=9.0))
    tb.close()
    scalars, _, purges = read_run(tmp_path)
    assert purges == [2]
    assert scalars["train/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 9.0, 4: 9.0})


def test_only_the_main_process_writes(tmp_path):
    tb = tblog.TensorBoard(tmp_path, 0, enabled=False)
    tb.step(_record(1))
    tb.evaluation(1, {"liver_dice_global": 0.5})
    tb.predictions(1, [_case(0)], [_case(0).label])
    tb.close()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_is_one_line_and_the_end_of_the_events(tmp_path, capsys, monkeypatch):
    from hrseg.train import tblog
    board = tblog.TensorBoard(tmp_path, 0, enabled=True)
    board.step({"step": 1, "loss": 0.5})

    def broken(event):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(board.writer, "write_event", broken)
    board.step({"step": 2, "loss": 0.4})         # fails: one line, the writer is dropped
    board.step({"step": 3, "loss": 0.3})         # nothing more is tried
    board.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hrseg: TensorBoard: events not written" in err[0], err
    assert "Input/output error" in err[0] and board.writer is None
    (tmp_path / "full").mkdir()
    full = tblog.TensorBoard(tmp_path / "full", 0, enabled=True)

    def no_space(event):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(full.writer, "write_event", no_space)
    full.step({"step": 1, "loss": 0.5})          # the run's own error line reports a full disk
    assert full.writer is None and capsys.readouterr().err == ""
