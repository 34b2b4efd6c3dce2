"""A benchmark's result as a committed artifact: who measured what, where, how (issue 33).

Every benchmark that a figure in the README or docs comes from starts its JSON with
:func:`header` — date (UTC), machine, the command as typed, JAX's version — and ends with
:func:`emit`: printed, and written to ``--out`` (``benchmarks/results/…``) when given.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys


def cpu_model() -> dict:
    """The CPU's name and its widest vector ISA (PyTorch and XLA pick kernels by it)."""
    try:
        with open("/proc/cpuinfo") as f:
            rows = [line.split(":", 1) for line in f if ":" in line]
    except OSError:
        return {"processor": platform.processor()}
    info = {k.strip(): v.strip() for k, v in reversed(rows)}
    flags = set(info.get("flags", "").split())
    isa = next((i for i in ("avx512f", "avx2", "avx") if i in flags), "")
    return {"processor": info.get("model name", platform.processor()), "isa": isa}


def header() -> dict:
    import jax
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"node": platform.node(), "cpus": os.cpu_count(), **cpu_model(),
                        "python": platform.python_version()},
            "command": " ".join(["python", *sys.argv]), "jax": jax.__version__}


def emit(out: dict, path: str | None, indent: int | None = 1) -> None:
    """Print ``out`` as JSON; also write it to ``path`` (its folder made) when given."""
    text = json.dumps(out, indent=indent)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)
