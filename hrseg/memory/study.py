"""Memory tables of notebooks 01 and 05: the analytic count against XLA's compiled figure per
resolution and mesh, per-device memory against the number of devices (explicit halos, plain
GSPMD, ideal), and the paper's U-Net schedule on one device per resolution.

Rows are dicts (``results.markdown_table`` / ``results.write_csv`` print and store them);
memory in MiB. Every compiled step is compiled once per :class:`Compiled` (seconds each).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hrseg.memory.analytic import estimate
from hrseg.memory.compiled import measure
from hrseg.nn import unet

MiB = 2 ** 20


def _mesh_name(mesh) -> str:
    return "·".join(map(str, mesh))


class Compiled:
    """``memory.measure`` of one preset's training step (batch 1, Adafactor), cached by
    ``(resolution, mesh, backend)``."""

    def __init__(self, model: str, batch: int = 1):
        self.model, self.batch, self._cache = model, batch, {}

    def __call__(self, res: int, mesh: Sequence[int], backend: str = "halo") -> dict:
        key = (int(res), tuple(mesh), backend)
        if key not in self._cache:
            self._cache[key] = measure(unet.preset(self.model), (res, res, res),
                                       mesh=tuple(mesh), batch=self.batch, backend=backend)
        return self._cache[key]


def analytic_vs_compiled(compiled: Compiled, resolutions: Sequence[int],
                         meshes: Sequence[Sequence[int]]) -> list[dict]:
    """One row per (resolution, spatial mesh): analytic and compiled MiB per device (halo)."""
    rows = []
    for res in resolutions:
        for mesh in meshes:
            est = estimate(unet.preset(compiled.model), (res, res, res), mesh=tuple(mesh),
                           batch=compiled.batch)
            got = compiled(res, mesh)
            rows.append({"resolution": f"{res}³", "mesh x·y·z": _mesh_name(mesh),
                         "devices": int(np.prod(mesh)), "analytic MiB": est["total"] / MiB,
                         "compiled MiB": got["total"] / MiB,
                         "compiled / analytic": got["total"] / est["total"],
                         "compile s": got["compile_s"]})
    return rows


def memory_vs_devices(compiled: Compiled, res: int,
                      meshes: Sequence[Sequence[int]]) -> list[dict]:
    """Compiled MiB per device of the step at ``res``³ on each mesh: *halo* (explicit halo
    exchange), *gspmd* (plain jit, XLA partitions) and *ideal*: every device keeps the whole
    training state and exactly 1/P of the single-device temporaries."""
    single = compiled(res, (1, 1, 1))
    state = single["argument"] + single["output"] - single["alias"]
    rows = []
    for mesh in meshes:
        p = int(np.prod(mesh))
        halo_b = compiled(res, mesh)["total"]
        gspmd_b = compiled(res, mesh, "gspmd")["total"] if p > 1 else halo_b
        rows.append({"devices": p, "mesh x·y·z": _mesh_name(mesh), "halo MiB": halo_b / MiB,
                     "gspmd MiB": gspmd_b / MiB, "ideal MiB": (state + single["temp"] / p) / MiB})
    return rows


def paper_schedule(resolutions: Sequence[int]) -> list[dict]:
    """The paper's 3D U-Net (one more level with half the filters per doubling of the
    resolution, bfloat16, batch 1) on one device, analytic: rows for ``results.memory_figure``."""
    return [{"resolution": f"{res}³", "voxels": res ** 3,
             "memory_bytes": estimate(unet.preset("paper", res), (res, res, res),
                                      batch=1)["total"],
             "label": "paper's 3D U-Net schedule (Hou et al.), 1 device (analytic)"} for res in resolutions]
