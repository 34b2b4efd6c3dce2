"""Orbax checkpoints of the TrainState, and JSON results written atomically beside them.

Layout of ``runs/<name>/checkpoints/``: one orbax directory per step (``100/``, ``200/`` …,
the newest ``keep`` kept) and ``eval_<step>.json`` per evaluation (all kept: a results table
averages the last few). Orbax writes a step into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the newest one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from hrseg import atomic

_AFTER_SHUTDOWN = "cannot schedule new futures after shutdown"


# orbax logs every save and restore at INFO through absl; a training log wants none of that.
# A read-only manager (evaluate, predict) is read-only by design: drop orbax's warnings that
# say so ("Given directory is read only=...", "read_only=True, setting max_to_keep=None").
# A full disk is reported once, as one line (atomic.DiskFull), not as the tracebacks orbax's
# background threads (and asyncio, for their futures) log.
def _quiet(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, KeyboardInterrupt):
        return False        # Ctrl-C / SIGTERM while orbax waits: hrseg.cli says it in one line
    if isinstance(exc, RuntimeError) and str(exc) == _AFTER_SHUTDOWN:
        return False        # a save cut short by Ctrl-C / SIGTERM: its writer thread, at exit,
                            # finds the executors shut down (the unfinished step folder is
                            # orbax's temporary one, removed by the next run; hrseg.cli has
                            # said "stopped by ...")
    msg = record.getMessage()
    if any(s in msg for s in ("Given directory is read only", "read_only=True",
                              "was found in the checkpoint, but could not be restored")):
        return False
    return not (atomic.is_disk_full(record.exc_info[1] if record.exc_info else None)
                or "No space left on device" in msg)


logging.getLogger("absl").setLevel(logging.WARNING)
logging.getLogger("absl").addFilter(_quiet)
# orbax's writer futures that failed on a full disk are logged again by asyncio when they are
# garbage-collected ("_GatheringFuture exception was never retrieved"): the same fault.
logging.getLogger("asyncio").addFilter(_quiet)
# and a writer coroutine that never ran because the disk filled first is reported by Python at
# exit ("coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited")
warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize_from_host\.",
                        category=RuntimeWarning)


class DamagedCheckpoint(ValueError):
    """A step folder that orbax cannot restore (a file truncated or deleted)."""


class Checkpoints:
    """The TrainState checkpoints of one run directory."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """``read_only``: to list or restore (evaluation, inspection) without touching the
        folder. A writer removes the unfinished ``*.orbax-checkpoint-tmp*`` folders of a killed
        run in the background; two writers on one folder would race on that."""
        self.directory = Path(directory).absolute()
        self.keep = max(int(keep), 1)
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint folder {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save and not read_only)
        with _disk_full_names(self.directory):
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        """Newest complete step, or None."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, metadata: dict | None = None) -> None:
        """Start saving (returns once the arrays are copied off the devices, so the caller
        may donate ``state`` to the next step; the write finishes in the background).
        ``metadata``: JSON-able, kept in the step's own metadata (the run's fixed config)."""
        with _disk_full_names(self.directory):
            self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True,
                               custom_metadata=metadata or {})

    def metadata(self, step: int) -> dict:
        """The ``metadata`` saved with ``step`` ({} for a checkpoint saved without)."""
        try:
            return dict(self._manager.metadata(int(step)).custom_metadata or {})
        except Exception:  # noqa: BLE001 (orbax raises many kinds for a damaged step)
            return {}

    def restore(self, like, step: int | None = None):
        """The state saved at ``step`` (default: newest), placed like ``like`` (a state or an
        abstract state with shardings: the mesh may differ from the one that saved it).
        A step that does not exist is FileNotFoundError listing those that do; one that
        cannot be read is DamagedCheckpoint."""
        step = self.latest() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.steps():
            have = ", ".join(map(str, self.steps())) or "none"
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} "
                                    f"(steps: {have})")
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract(like)))
        except Exception as e:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DamagedCheckpoint(f"checkpoint {self.directory / str(step)} is damaged: "
                                    f"{first}") from None

    def restore_intact(self, like, warn=None):
        """``(state, step)`` of the newest checkpoint that restores; ``warn(line)`` for each
        damaged one skipped. None if there is no checkpoint; DamagedCheckpoint if all are."""
        steps = self.steps()
        damaged = []
        for s in reversed(steps):
            try:
                state = self.restore(like, s)
            except DamagedCheckpoint as e:
                damaged.append(s)
                last = e
                continue
            if damaged and warn is not None:
                warn(f"checkpoint step {', '.join(map(str, damaged))} in {self.directory} "
                     f"is damaged; using step {s}, the newest intact one")
            return state, s
        if damaged:
            raise DamagedCheckpoint(f"every checkpoint in {self.directory} is damaged "
                                    f"(steps {', '.join(map(str, damaged))}): {last}")
        return None

    def discard(self, step: int) -> None:
        """Remove a (damaged) step so that training can write it again."""
        with _disk_full_names(self.directory):
            self._manager.delete(int(step))

    def prune(self) -> None:
        """Keep the newest ``keep`` steps (a run killed right after a save can hold one more:
        orbax deletes the oldest only after the newest is final)."""
        for s in self.steps()[:-self.keep]:
            with _disk_full_names(self.directory):
                self._manager.delete(s)

    def wait(self) -> None:
        with _disk_full_names(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:   # after a full disk orbax's close can fail on it again: the same one line
            with _disk_full_names(self.directory):
                self._manager.close()

    def eval_path(self, step: int) -> Path:
        return self.directory / f"eval_{int(step):08d}.json"

    def evals(self) -> dict[int, dict]:
        """Every evaluation JSON of the run, by step (a damaged one is skipped)."""
        out = {}
        for p in sorted(self.directory.glob("eval_*.json")):
            try:
                out[int(p.stem.split("_")[1])] = json.loads(p.read_text())
            except (ValueError, OSError):
                continue
        return out


@contextlib.contextmanager
def _disk_full_names(where: Path):
    """An ENOSPC raised inside orbax (any wrapper) becomes atomic.DiskFull naming ``where``."""
    try:
        yield
    except Exception as e:
        if atomic.is_disk_full(e) and not isinstance(e, atomic.DiskFull):
            raise atomic.DiskFull(where) from None
        raise


def abstract(tree):
    """ShapeDtypeStructs (keeping shardings) of a pytree of arrays."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(leaf, tree)


def recorded_config(directory: str | Path) -> str | None:
    """The config YAML saved in the newest checkpoint of ``directory`` that records one, or
    None (no checkpoint folder, no checkpoints, or checkpoints saved without it)."""
    if not Path(directory).is_dir():
        return None
    ckpts = Checkpoints(directory, read_only=True)
    try:
        for s in reversed(ckpts.steps()):
            text = ckpts.metadata(s).get("config")
            if isinstance(text, str) and text.strip():
                return text
    finally:
        ckpts.close()
    return None
