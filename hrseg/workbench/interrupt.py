"""Stopping a command cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's stop).

:func:`catch_signals` turns SIGTERM into :class:`Terminated`, a KeyboardInterrupt, so that both
signals unwind the command through its ``finally`` blocks (the run lock released, orbax's
checkpoint writes finished, ``hrseg run --jobs``' children signalled); :func:`stop_children`
then stops every process the command started — papermill's kernels lead their own sessions,
so they never get the terminal's signal; they are SIGKILLed at once (:func:`kill_kernels`),
the rest get SIGTERM — waits for them, and SIGKILLs what is left. hrseg.cli
prints the one line and exits 128 + the signal's number.
"""
from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every ``finally`` runs (locks
    released, checkpoints finished, children stopped)."""


STOP_WAIT_S = 20          # how long stopped children get before SIGKILL


def catch_signals() -> dict:
    """SIGTERM becomes :class:`Terminated`; once one of SIGINT / SIGTERM has arrived, more of
    them are ignored so that the clean-up is not cut short. Returns the handlers before."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_kernels()
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return before


def stop_children(wait_s: float = STOP_WAIT_S) -> int:
    """SIGTERM to every descendant process and its process group (papermill's kernels and
    ``hrseg run --jobs`` children lead their own sessions, so they do not get the terminal's
    signal), wait for them, SIGKILL what is left. Returns how many there were."""
    import os
    import signal
    try:
        import psutil
    except ImportError:        # (installed with jupyter; without it there are no kernels)
        return 0
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    own = os.getpgrp()

    def send(sig):
        for p in procs:
            try:
                pgid = os.getpgid(p.pid)
                if pgid != own:
                    os.killpg(pgid, sig)
                p.send_signal(sig)
            except (OSError, psutil.Error):
                pass
    send(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    if alive:
        procs = alive
        send(signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
    return len(procs)


def kill_kernels() -> None:
    """SIGKILL the notebook kernels among the descendants, before the command unwinds: a
    kernel whose client goes away first prints tracebacks into the user's terminal, and its
    cell's work is lost either way (a training notebook resumes from its checkpoint)."""
    import os
    import signal
    try:
        import psutil
        kernels = [p for p in psutil.Process().children(recursive=True)
                   if any("ipykernel" in part for part in p.cmdline())]
    except Exception:  # noqa: BLE001 (no psutil, a process that just ended: nothing to do)
        return
    own = os.getpgrp()
    for p in kernels:
        try:
            pgid = os.getpgid(p.pid)
            if pgid != own:
                os.killpg(pgid, signal.SIGKILL)
            p.kill()
        except (OSError, psutil.Error):
            pass
