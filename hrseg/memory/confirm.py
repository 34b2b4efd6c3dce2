"""Compile a planned training step wherever it can be compiled: here, or in a child process.

The planner confirms its pick with XLA's own figure (``compiled.measure``: the real step compiled
on ShapeDtypeStructs, seconds, nothing allocated). A mesh of N devices needs N devices to
compile on; a process that has fewer (jax starts with one CPU device unless
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` was set before it was imported) cannot
get more, so ``where="auto"`` compiles in a child process started with N fake CPU devices (the
same flag hrseg/parallel/devices.py sets for the notebooks); ``where="here"`` refuses with one
line that says what to set.

    python -m hrseg.memory.confirm '<json requests>'   # the child: prints measure()'s JSON list
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import jax

from hrseg.config import ModelConfig
from hrseg.memory import compiled
from hrseg.parallel import partition

FLAG = "--xla_force_host_platform_device_count"
WHERE = ("auto", "here")


class CannotCompile(ValueError):
    """This process cannot compile the mesh asked for (one line, for ``hrseg memory``)."""


def devices_needed(mesh, backend: str = "halo") -> int:
    """Devices a compile of ``mesh`` = ``(data, sx, sy, sz)`` needs (what the backend uses)."""
    return math.prod(partition.devices_used(tuple(mesh), backend))


def _request(model_cfg: ModelConfig, shape, mesh, batch, optimizer, in_channels) -> dict:
    return {"model": model_cfg.__dict__, "shape": list(shape), "mesh": list(mesh),
            "batch": batch, "optimizer": optimizer, "in_channels": in_channels}


def _measure(req: dict) -> dict:
    out = compiled.measure(ModelConfig(**req["model"]), tuple(req["shape"]), tuple(req["mesh"]),
                           optimizer=req["optimizer"], batch=req["batch"],
                           in_channels=req["in_channels"])
    out["mesh"] = list(out["mesh"])
    return out


def compile_step(model_cfg: ModelConfig, shape, mesh, batch: int = 1,
                 optimizer: str = "adafactor", in_channels: int = 1,
                 where: str = "auto") -> dict:
    """``compiled.measure`` of the training step on ``mesh`` = ``(data, sx, sy, sz)``, halo
    backend: in this process when it has the devices, else (``where="auto"``) in a child process
    with that many fake CPU devices. Adds ``"where"``: ``"here"`` or ``"subprocess"``."""
    return compile_steps([model_cfg], shape, mesh, batch, optimizer, in_channels, where)[0]


def compile_steps(model_cfgs, shape, mesh, batch: int = 1, optimizer: str = "adafactor",
                  in_channels: int = 1, where: str = "auto") -> list[dict]:
    """:func:`compile_step` of several models on the same mesh; one child process compiles
    them all (it starts jax once)."""
    if where not in WHERE:
        raise ValueError(f"compile where={where!r}: give one of {', '.join(WHERE)}")
    need = devices_needed(mesh)
    reqs = [_request(c, shape, mesh, batch, optimizer, in_channels) for c in model_cfgs]
    have = jax.device_count()
    if need <= have or not reqs:
        return [_measure(r) | {"where": "here"} for r in reqs]
    mesh_txt = "×".join(map(str, mesh))
    if where == "here":
        raise CannotCompile(f"compiling the {mesh_txt} mesh needs {need} devices and this "
                            f"process has {have} ({jax.default_backend()}): set XLA_FLAGS={FLAG}"
                            f"={need} before jax is imported, or let it compile in a "
                            f"subprocess (compile='auto')")
    flags = re.sub(FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = dict(os.environ, XLA_FLAGS=f"{flags} {FLAG}={need}".strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "hrseg.memory.confirm", json.dumps(reqs)],
                          capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise CannotCompile(f"compiling the {mesh_txt} mesh on {need} fake CPU devices in a "
                            f"subprocess failed: {last}")
    return [o | {"where": "subprocess"}
            for o in json.loads(proc.stdout.strip().splitlines()[-1])]


if __name__ == "__main__":
    print(json.dumps([_measure(r) for r in json.loads(sys.argv[1])]))
