"""The run directory ``<train.out_dir>/<train.name>/``: its layout, its lock, its fixed config,
and reading its metrics back. Every other module asks here for a run's paths.

    config.yaml       the run's config (fixed: see MAY_CHANGE), written atomically
    history.jsonl     one line per start: the step it started at, resumable settings changed
    metrics.jsonl     one line per training step, one per evaluation (MetricsLog, read_metrics)
    result.json       the summary of the last invocation (loop.RunResult)
    events.out.tfevents.*  the same metrics and validation images for TensorBoard (tblog.py)
    checkpoints/      orbax step folders + eval_<step>.json (checkpoint.Checkpoints)
    predictions/      prediction-N.nii.gz of `hrseg predict`
    .lock             flock'd by the one process training the run (readers take no lock)
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from hrseg import atomic, config, yamlsafe
from hrseg.config import Config

CONFIG, HISTORY, METRICS, RESULT = "config.yaml", "history.jsonl", "metrics.jsonl", "result.json"
CHECKPOINTS, PREDICTIONS, LOCK = "checkpoints", "predictions", ".lock"

# Settings a resumed run may change (tagged in hrseg/schema.py; the rest — model, data, mesh
# layout, optimizer, loss, seed — is fixed at the first start: the checkpoints and the data
# order depend on it).
MAY_CHANGE = config.keys(resume=True)


class RunBusy(RuntimeError):
    """Another process holds the run's lock."""


class ConfigChanged(ValueError):
    """A resume with different fixed settings."""


def path_of(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / cfg.train.name


def checkpoints(run: str | Path) -> Path:
    return Path(run) / CHECKPOINTS


def predictions(run: str | Path) -> Path:
    return Path(run) / PREDICTIONS


def eval_path(run: str | Path, step: int) -> Path:
    return checkpoints(run) / f"eval_{int(step):08d}.json"


def is_run(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_config(run: str | Path) -> Config:
    """The run's fixed config: ``config.yaml``, or — deleted — the one its newest checkpoint
    recorded (read-only: nothing is written back here; see :func:`restore_config`)."""
    path = Path(run) / CONFIG
    if not path.is_file():
        text = _recorded(run)
        if text is None:
            raise FileNotFoundError(f"{run} is not a run directory (no {CONFIG})")
        return config.validate(config.from_dict(yamlsafe.loads(text, f"{run}: checkpoint")))
    return config.load(path)


def _recorded(run: str | Path) -> str | None:
    if not any(p.name.isdigit() for p in _listing(checkpoints(run))):
        return None
    from hrseg.train import checkpoint  # (orbax: only when there are checkpoints)
    return checkpoint.recorded_config(checkpoints(run))


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def restore_config(run: str | Path) -> bool:
    """A run folder with checkpoints but no ``config.yaml`` (deleted): write it back from the
    newest checkpoint's record, with one line; refuse (ValueError) when the checkpoints record
    none, since resuming would then fix nothing. True if restored."""
    run = Path(run)
    if is_run(run) or not any(p.name.isdigit() for p in _listing(checkpoints(run))):
        return False
    text = _recorded(run)
    if text is None:
        raise ValueError(f"{run} has checkpoints but no {CONFIG}, and its checkpoints do not "
                         f"record the config: put {CONFIG} back, or start a new run with "
                         f"--set train.name=<new name>")
    atomic.write_text(run / CONFIG, text)
    print(f"hrseg: {run / CONFIG} was missing: restored from the newest checkpoint's record",
          file=sys.stderr)
    return True


def flat(cfg: Config) -> dict[str, object]:
    """``{"model.base": 8, ...}`` of a config."""
    return {f"{sec}.{k}": v for sec, d in config.to_dict(cfg).items() for k, v in d.items()}


def changes(old: Config, new: Config) -> dict[str, tuple]:
    """``{key: (old, new)}`` of every setting that differs."""
    a, b = flat(old), flat(new)
    return {k: (a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)}


def check_resume(run: str | Path, cfg: Config) -> dict[str, tuple]:
    """The resumable settings that changed; a fixed one that changed is ConfigChanged."""
    diff = changes(read_config(run), cfg)
    fixed = {k: v for k, v in diff.items() if k not in MAY_CHANGE}
    if fixed:
        listed = ", ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in fixed.items())
        raise ConfigChanged(
            f"{run} was started with other settings ({listed}); a run's model, data and mesh "
            f"are fixed: start a new run with --set train.name=<new name>, or drop the changes")
    return {k: v for k, v in diff.items() if k in MAY_CHANGE}


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (list, str)) else str(v)


def record_start(run: str | Path, cfg: Config, step: int) -> None:
    """Write ``config.yaml`` (atomically) and a history line: the start step and the
    resumable settings that differ from the previous start."""
    run = Path(run)
    changed = check_resume(run, cfg) if is_run(run) else {}
    atomic.write_text(run / CONFIG, config.dumps(cfg))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": int(step), "pid": os.getpid(),
             "changed": {k: list(v) for k, v in changed.items()}}
    atomic.append_line(run / HISTORY, json.dumps(entry))


def history(run: str | Path) -> list[dict]:
    return read_metrics(Path(run) / HISTORY)


class Lock:
    """``fcntl.flock`` on ``<run>/.lock``: held by one training process; the kernel releases
    it when that process ends, however it ends (a SIGKILLed run leaves no stale lock)."""

    def __init__(self, run: str | Path):
        self.run = Path(run)
        self._fd: int | None = None

    def acquire(self) -> Lock:
        self.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run / LOCK, os.O_RDWR | os.O_CREAT, atomic.file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunBusy(f"{self.run} is in use by process {holder} (a run is trained by one "
                          f"process at a time); wait for it to end, or choose another "
                          f"train.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)    # closing the descriptor drops the flock
            self._fd = None



def read_metrics(path: str | Path, tolerate_cut_end: bool = True) -> list[dict]:
    """The records of a JSON-lines file. A damaged line is a ValueError naming the file and
    line; a cut last line (a process killed, or a full disk, mid-write) is dropped unless
    ``tolerate_cut_end`` is False."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_cut_end and i == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path} line {i}: not a JSON record ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path} line {i}: not a JSON object")  # noqa: TRY004
        out.append(rec)
    return out


class MetricsLog:
    """``metrics.jsonl`` of process 0; on resume, lines past the restored step are dropped
    (the steps after the checkpoint are run again and logged again)."""

    def __init__(self, path: str | Path, keep_until: int, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            atomic.append_line(self.path, json.dumps(record, default=atomic.jsonable))
