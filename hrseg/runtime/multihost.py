"""Multi-host start-up: ``jax.distributed.initialize`` from the ``runtime`` config section.

One training script runs on 1 CPU device, 8 fake devices, a GPU and a multi-host pod: every
process runs the same program and jax.distributed connects them (train/distributed.py then
assembles global arrays from what each process loaded).
"""
from __future__ import annotations

import os

import jax

from hrseg.schema import RuntimeConfig


def initialize(cfg: RuntimeConfig) -> None:
    """``jax.distributed.initialize`` when ``runtime.distributed`` is set (once per process).

    Empty/zero/negative fields fall back to ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``; with none of those jax detects the cluster itself (SLURM, TPU pods,
    Open MPI, Kubernetes).
    """
    if not cfg.distributed or jax.distributed.is_initialized():
        return
    env = os.environ
    coordinator = cfg.coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    num = cfg.num_processes or int(env.get("JAX_NUM_PROCESSES", 0)) or None
    pid = cfg.process_id if cfg.process_id >= 0 else int(env.get("JAX_PROCESS_ID", -1))
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=None if pid < 0 else pid)
