"""The assembly of global arrays from what each process loaded (jax.distributed is started by
hrseg.runtime.multihost).

One training script runs on 1 CPU device, 8 fake devices, a GPU and a multi-host pod: every
process runs the same program; jax.distributed connects them; each process reads only the
batch rows its own devices hold and the global array is assembled from those pieces.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def is_main() -> bool:
    """Process 0 writes files and shows progress; the others compute silently."""
    return jax.process_index() == 0


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(group, groups)``: this process needs batch rows ``[group*b, (group+1)*b)`` with
    ``b = shape[0] // groups`` — the rows its devices hold, in the data module's terms
    (data.batch_for_step(process_index=group, process_count=groups)).

    One process holds every row (``(0, 1)``); with the "data" mesh axis across hosts each
    host holds its contiguous block; when a host's devices split a volume spatially it
    still loads the whole volume of its rows and places only its blocks.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[0].indices(shape[0])))
    rows = sorted(rows)
    b = len(rows)
    if rows != list(range(rows[0], rows[0] + b)) or shape[0] % b or rows[0] % b:
        raise ValueError(f"process {jax.process_index()} holds batch rows {rows} of "
                         f"{shape[0]}: not one aligned contiguous block; make the global "
                         f"batch a multiple of mesh.data and put the data axis across hosts")
    return rows[0] // b, shape[0] // b


def global_array(sharding: NamedSharding, local: np.ndarray, shape: tuple[int, ...],
                 group: int) -> jax.Array:
    """The global array from this process's rows ``local`` (rows ``group*len(local)…``)."""
    if jax.process_count() == 1 and local.shape == tuple(shape):
        return jax.device_put(local, sharding)
    offset = group * local.shape[0]

    def block(index):
        rows = index[0].indices(shape[0])
        return local[(slice(rows[0] - offset, rows[1] - offset),) + tuple(index[1:])]

    return jax.make_array_from_callback(tuple(shape), sharding, block)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one NumPy array on every process."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
    """Wait for every process (file system writes of process 0 become visible)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
