"""``hrseg run --jobs N``: execute up to N of the pipeline's notebooks at the same time.

On 2 CPU cores one notebook leaves a core idle much of the time (XLA compiles on one thread,
papermill and the kernel start-up wait on I/O), so two at a time shorten the study's wall time.
Each run is executed by a child ``hrseg run --only <run> --jobs 1`` (its own process, its own
kernel), its output captured in ``<out>/<run>.log``; this process prints one line when a run
starts and one when it ends.

Order: the runs start in the pipeline's order, at most ``jobs`` at once. The runs of the
study's last notebook (the results table, which reads every other run) start only when all
other runs have ended (hrseg.workbench.pipeline.run makes them a second stage); the others are
independent — they share only the phantom dataset, which ``hrseg.workbench.pipeline.ensure_phantom``
writes once, under a lock. The first failure stops the pipeline: no new run starts, the running
ones are stopped, and the failing run's one-line error is raised as :class:`RunFailed`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5


class RunFailed(RuntimeError):
    """A run's child failed; ``str(e)`` is its one-line error."""


def command(name: str, params_dir: Path, out: Path, extra: dict | None) -> list[str]:
    """The child that executes the one run ``name``."""
    cmd = [sys.executable, "-m", "hrseg.cli", "run", "--params-dir", str(params_dir),
           "--only", name, "--out", str(out), "--quiet", "--jobs", "1"]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    return cmd


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal the child and its notebook kernel (the child leads its own process group)."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):          # the child's own one-line error, if it printed one
        if ln.startswith("hrseg run: "):
            return ln[len("hrseg run: "):].removeprefix("error: ")
    return lines[-1] if lines else ""


def run_parallel(stages: list[list[str]], params_dir: str | Path, out: str | Path, jobs: int,
                 progress: bool = True, extra: dict | None = None,
                 env: dict | None = None) -> None:
    """Execute the runs named in ``stages``, ``jobs`` at a time; a stage starts when the one
    before it has ended. ``env``: added to the children's environment. Raises RunFailed."""
    params_dir, out = Path(params_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total, started = sum(len(s) for s in stages), 0
    say = print if progress else (lambda *a, **k: None)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for stage in stages:
        pending = list(stage)
        running: dict[str, tuple[subprocess.Popen, float, Path, int]] = {}
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    name = pending.pop(0)
                    started += 1
                    log = out / f"{name}.log"
                    with open(log, "wb") as fh:  # the child keeps its own copy of the handle
                        p = subprocess.Popen(command(name, params_dir, out, extra), stdout=fh,
                                             stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)  # kernel included
                    running[name] = (p, time.perf_counter(), log, started)
                    say(f"[{started}/{total}] {name} started (log {log})", flush=True)
                time.sleep(POLL_S)
                for name, (p, t0, log, i) in list(running.items()):
                    if p.poll() is None:
                        continue
                    del running[name]
                    if p.returncode != 0:
                        raise RunFailed(_last_line(log) or
                                            f"{name} failed (exit {p.returncode}) — see {log}")
                    say(f"[{i}/{total}] {name} done in {time.perf_counter() - t0:.0f} s",
                        flush=True)
        finally:
            for p, *_ in running.values():   # a failure or Ctrl-C: stop the others too
                _signal_group(p, signal.SIGTERM)
            for p, *_ in running.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _signal_group(p, signal.SIGKILL)
                    p.wait()
