"""The preprocessed-volume cache on disk: entries that verify what they load, and pruning.

An entry is ``<cache_dir>/<grid>/<case>-<key>`` + ``.image.npy``, ``.label.npy`` and the
sidecar ``.json`` (written last: the entry's commit marker). Besides the case's metadata the
sidecar records where the entry came from — each source file's path, size, mtime and SHA-256
— and what it holds: each array's shape, dtype, byte size and SHA-256. :func:`load` checks
both before the arrays are used: a damaged entry (truncated, changed, unreadable) or a stale
one (its source replaced, even with size and mtime kept) is rebuilt with one line naming it.
:func:`scan` / :func:`prune` are ``hrseg cache DIR [--prune]``: they list entries with their
state and remove only entries of this cache whose source changed or is gone, damaged ones,
and left-over pieces — never a file not named like an entry.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrseg import atomic

PARTS = (".image.npy", ".label.npy")
SIDECAR = ".json"
_ENTRY = re.compile(r"^(?P<stem>.+-[0-9a-f]{16})(?P<part>\.image\.npy|\.label\.npy|\.json)$")
_CHUNK = 1 << 22


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def source_record(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256(path)}


def _paths(stem: Path) -> tuple[Path, Path, Path]:
    return (stem.with_name(stem.name + SIDECAR), *(stem.with_name(stem.name + p) for p in PARTS))


def _save_npy(path: Path, array: np.ndarray) -> dict:
    with atomic.open_atomic(path, "wb") as f:
        np.save(f, array)
    return {"shape": list(array.shape), "dtype": str(array.dtype),
            "size": path.stat().st_size, "sha256": sha256(path)}


def write(stem: Path, image: np.ndarray, label: np.ndarray, meta: dict,
          sources: dict[str, Path]) -> None:
    """Write an entry: the arrays, then the sidecar (``meta`` + sources + arrays)."""
    side, img_path, lab_path = _paths(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"image": _save_npy(img_path, image), "label": _save_npy(lab_path, label)}
    atomic.write_json(side, {**meta, "sources": {k: source_record(p) for k, p in sources.items()},
                             "arrays": arrays}, indent=None)


def problem(stem: Path, sources: dict[str, Path] | None = None,
            hash_sources: bool = True) -> str | None:
    """Why the entry at ``stem`` cannot be used (None: it can). ``sources``: the files it
    must have been built from (default: those its sidecar names)."""
    side, *parts = _paths(stem)
    try:
        meta = json.loads(side.read_text())
        recorded, arrays = meta["sources"], meta["arrays"]
    except FileNotFoundError:
        return "no sidecar"
    except KeyError:
        return "written by an older hrseg (no checksums)"
    except (ValueError, TypeError, OSError) as e:
        return f"damaged sidecar ({type(e).__name__})"
    for key, path in (sources or {k: Path(v["path"]) for k, v in recorded.items()}).items():
        rec = recorded.get(key, {})
        try:
            st = path.stat()
        except OSError:
            return f"stale: its source {path} is gone"
        if (st.st_size, st.st_mtime_ns) != (rec.get("size"), rec.get("mtime_ns")) or (
                hash_sources and sha256(path) != rec.get("sha256")):
            return f"stale: its source {path} changed"
    for name, path in zip(("image", "label"), parts, strict=True):
        rec = arrays.get(name, {})
        try:
            if path.stat().st_size != rec.get("size") or sha256(path) != rec.get("sha256"):
                return f"damaged: {path.name} is not what was written"
        except OSError:
            return f"damaged: {path.name} is missing"
    return None


_said: set[str] = set()


def _say(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(f"hrseg: data cache: {line}", file=sys.stderr)


def load(stem: Path, sources: dict[str, Path], build: Callable[[], tuple]):
    """``(image memmap, label memmap, meta)`` of the entry, built by ``build() -> (image,
    label, meta)`` when it is missing, damaged or stale (one line names a rebuilt one)."""
    side, img_path, lab_path = _paths(stem)
    if side.is_file():
        why = problem(stem, sources)
        if why is not None:
            print(f"hrseg: data cache: {side}: {why}; rebuilding it", file=sys.stderr)
    else:
        why = "missing"
    if why is not None:
        image, label, meta = build()
        try:
            write(stem, image, label, meta, sources)
        except OSError as e:        # an unwritable cache costs a line, not the run
            if atomic.is_disk_full(e):
                raise
            _say(f"cannot write {stem.parent} ({e.strerror or e}); the volumes are used "
                 f"without caching them (set data.cache_dir to a writable folder)")
            return image, label, meta
    meta = json.loads(side.read_text())
    try:
        image, label = (np.load(p, mmap_mode="r") for p in (img_path, lab_path))
    except (ValueError, OSError) as e:     # changed between the check and here
        raise ValueError(f"{stem}: cache entry unreadable ({e}); run `hrseg cache "
                         f"{stem.parent.parent} --prune`") from None
    for arr, name in ((image, "image"), (label, "label")):
        want = meta["arrays"][name]
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            raise ValueError(f"{stem}: cache entry {name} is {arr.shape} {arr.dtype}, its "
                             f"sidecar says {want['shape']} {want['dtype']}")
    return image, label, meta


@dataclass(frozen=True)
class Entry:
    stem: Path
    files: tuple[Path, ...]
    size: int
    problem: str | None       # None: usable


def scan(cache_dir: str | Path, hash_sources: bool = False) -> list[Entry]:
    """Every entry (and left-over piece) under ``cache_dir``, with its state."""
    root = Path(cache_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: no such cache folder")
    groups: dict[Path, list[Path]] = {}
    for grid in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(grid.iterdir()):
            m = _ENTRY.match(f.name)
            if f.is_file() and m:
                groups.setdefault(grid / m["stem"], []).append(f)
            elif f.is_file() and f.name.startswith(".tmp-") and _ENTRY.match(f.name[5:]
                                                                              .split("-", 1)[-1]):
                groups.setdefault(f, []).append(f)       # a write cut short
    out = []
    for stem, files in groups.items():
        why = "left over from an interrupted write" if stem.name.startswith(".tmp-") else \
            problem(stem, hash_sources=hash_sources)
        out.append(Entry(stem, tuple(files), sum(f.stat().st_size for f in files), why))
    return out


def prune(entries: list[Entry]) -> list[Entry]:
    """Remove the files of every entry that has a problem; returns those removed."""
    gone = [e for e in entries if e.problem is not None]
    for e in gone:
        for f in e.files:
            f.unlink(missing_ok=True)
    return gone
