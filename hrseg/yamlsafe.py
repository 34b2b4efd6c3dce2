"""YAML read with bounds: a config is a small document of plain values, never a bomb.

:func:`read` refuses a file over :data:`MAX_BYTES` before parsing it, and :func:`loads` parses
with a loader that refuses anchors and aliases (``&a`` / ``*a``: ten aliases per level make a
376-byte file expand to gigabytes) and nesting deeper than :data:`MAX_DEPTH` — each a one-line
ValueError naming the file and line.
"""
from __future__ import annotations

from pathlib import Path

import yaml

MAX_BYTES = 1 << 20          # 1 MiB: the study's largest config is ~2 KiB
MAX_DEPTH = 32


class _Loader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases or deep nesting."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}" if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ValueError(f"{where}: YAML anchors and aliases (&name / *name) are not "
                             f"allowed in a config; write the values out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def loads(text: str, where: str = "<string>"):
    """The document in ``text``; ValueError ``<where>: ...`` for bad YAML, aliases, depth or
    size."""
    if len(text) > MAX_BYTES:
        raise ValueError(f"{where}: {len(text)} characters, more than a config may have "
                         f"({MAX_BYTES} bytes)")
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply") from None


def read(path: str | Path):
    """The document of the YAML file ``path`` (size checked before it is read)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a config may have ({MAX_BYTES} "
                         f"bytes = 1 MiB)")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    return loads(text, str(path))
