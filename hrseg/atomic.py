"""Atomic file writes: the one way the project writes a file.

A file is written to a temporary file in the same folder (a dot file ending in the real name,
so format-by-suffix writers such as ``nib.save`` and ``np.save`` behave, and dataset scans skip
it), flushed to disk (fsync), given the mode an ordinary ``open`` would give it (``mkstemp``
makes 0600), and renamed over the target. A reader sees the old file or the new one, never half
a file; a failed write leaves no temp file behind. A full disk becomes :class:`DiskFull`, whose
message names the file: ``no space left on device writing <path>``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (/proc/self/status);
    elsewhere by a set-and-restore round trip, at the first write rather than at import."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What ``open(path, "w")`` gives a new file: 0644 under the usual umask 022."""
    return 0o666 & ~_umask()


class DiskFull(OSError):
    """ENOSPC while writing ``filename``."""

    def __init__(self, path: str | Path):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device writing {self.filename}"


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from / during, each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception it was raised from / during is an ENOSPC."""
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
               or "No space left on device" in str(e)   # wrapped by tensorstore, orbax
               for e in _chain(exc))


def full_file(exc: BaseException | None) -> str | None:
    """The file a full disk was met writing: the first file name in ``exc``'s chain (a second
    fault while cleaning up after the first has none of its own)."""
    return next((str(e.filename) for e in _chain(exc)
                 if isinstance(e, OSError) and e.filename), None)


@contextlib.contextmanager
def temp_path(path: str | Path) -> Iterator[Path]:
    """``with temp_path(path) as tmp: write(tmp)``: ``tmp`` is fsynced and renamed to ``path``
    when the block ends, removed if it raises (for writers that take a path: ``nib.save``,
    ``savefig``, ``np.save``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name}")
    except OSError as e:
        raise (DiskFull(path) if is_disk_full(e) else e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFull(path) from None
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w", **kwargs) -> Iterator:
    """``with open_atomic(path) as f: f.write(...)``: the file appears when the block ends."""
    with temp_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path: str | Path, text: str) -> Path:
    with open_atomic(path, "w") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with open_atomic(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    """JSON with NumPy / jax scalars and arrays (``.tolist()``) and paths as strings."""
    text = json.dumps(obj, indent=indent, default=jsonable)   # fails before any file exists
    return write_text(path, text)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log (``metrics.jsonl``) and flush it to disk; a full disk is
    :class:`DiskFull` and leaves at most a cut last line, which its reader drops."""
    try:
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise (DiskFull(path) if is_disk_full(e) else e) from None


def jsonable(x):
    """NumPy / jax scalars and arrays, and paths, inside result dicts."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
