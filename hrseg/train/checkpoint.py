"""Orbax checkpoints of the TrainState, and JSON results written atomically beside them.

Layout of ``runs/<name>/checkpoints/``: one orbax directory per step (``100/``, ``200/`` …,
the newest ``keep`` kept) and ``eval_<step>.json`` per evaluation (all kept: a results table
averages the last few). Orbax writes a step into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the newest one.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp

# orbax logs every save and restore at INFO through absl; a training log wants none of that.
logging.getLogger("absl").setLevel(logging.WARNING)


class Checkpoints:
    """The TrainState checkpoints of one run directory."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """``read_only``: to list or restore (evaluation, inspection) without touching the
        folder. A writer removes the unfinished ``*.orbax-checkpoint-tmp*`` folders of a killed
        run in the background; two writers on one folder would race on that."""
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint folder {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1), create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save and not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        """Newest complete step, or None."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state) -> None:
        """Start saving (returns once the arrays are copied off the devices, so the caller
        may donate ``state`` to the next step; the write finishes in the background)."""
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

    def restore(self, like, step: int | None = None):
        """The state saved at ``step`` (default: newest), placed like ``like`` (a state or an
        abstract state with shardings: the mesh may differ from the one that saved it)."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract(like)))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def eval_path(self, step: int) -> Path:
        return self.directory / f"eval_{int(step):08d}.json"

    def evals(self) -> dict[int, dict]:
        """Every evaluation JSON of the run, by step."""
        out = {}
        for p in sorted(self.directory.glob("eval_*.json")):
            out[int(p.stem.split("_")[1])] = json.loads(p.read_text())
        return out


def abstract(tree):
    """ShapeDtypeStructs (keeping shardings) of a pytree of arrays."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(leaf, tree)


def write_json(path: str | Path, obj) -> None:
    """Write JSON so that a reader never sees half a file (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(x):
    """NumPy / jax scalars and arrays inside result dicts."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
