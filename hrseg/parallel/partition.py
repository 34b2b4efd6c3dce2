"""Meshes and shardings — the only module that knows how devices are arranged.

A volume is an array ``(B, X, Y, Z, C)`` (2D: ``(B, X, Y, C)``); spatial array axis 1 is split
over mesh axis ``"x"``, axis 2 over ``"y"``, axis 3 over ``"z"``, and the batch over ``"data"``.
Arrays keep nibabel's (x, y, z) voxel order so the mesh axis names mean what they say.

Three backends run the same network code (the table :data:`BACKENDS`):
  * ``"halo"``  — explicit ``jax.shard_map``; halo.py exchanges patch margins with ppermute;
  * ``"gspmd"`` — plain jit with NamedSharding on the spatial dims; XLA inserts halos itself;
  * ``"none"``  — one device, no partitioning.
A run decides its (mesh, backend) once, as a :class:`Layout`, and passes that along: nothing
else in the package asks which backend it is on.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axis names, defined here only: the batch axis, then array axes 1, 2, 3.
DATA = "data"
SPATIAL = ("x", "y", "z")
AXES = (DATA, *SPATIAL)


@dataclass(frozen=True)
class Backend:
    """How a backend runs the per-shard network code: the one place a backend is described."""
    name: str
    shard_map: bool    # run per shard in jax.shard_map; the model exchanges halos itself
    constrain: bool    # pin the inputs' shardings inside jit; XLA's partitioner does the rest
    one_device: bool   # ignore the mesh: everything on its first device


BACKENDS = {b.name: b for b in (
    Backend("halo", shard_map=True, constrain=False, one_device=False),
    Backend("gspmd", shard_map=False, constrain=True, one_device=False),
    Backend("none", shard_map=False, constrain=False, one_device=True),
)}


def backend(name: str) -> Backend:
    """The :data:`BACKENDS` entry of ``name``; an unknown name is an error listing them."""
    if name not in BACKENDS:
        raise ValueError(f"backend '{name}' is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_mesh(spatial: Sequence[int] = (1, 1, 1), data: int = 1, devices=None) -> Mesh:
    """A ``("data", "x", "y", "z")`` mesh of ``data × sx × sy × sz`` devices (Auto axis types).

    ``devices`` defaults to all of ``jax.devices()`` when their number matches, else the first
    ``data × sx × sy × sz`` of them (so a 1-device mesh works on an 8-device host).
    """
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) == 2:  # 2D networks: no z split
        spatial = spatial + (1,)
    if len(spatial) != 3 or any(s < 1 for s in spatial) or int(data) < 1:
        raise ValueError(f"make_mesh: spatial must be 2 or 3 positive ints and data >= 1, "
                         f"got spatial={spatial}, data={data}")
    shape = (int(data),) + spatial
    need = math.prod(shape)
    if devices is None:
        avail = jax.devices()
        if need > len(avail):
            raise ValueError(f"make_mesh: data×sx×sy×sz = {'×'.join(map(str, shape))} = {need} "
                             f"devices, but only {len(avail)} are available "
                             f"({avail[0].platform}); on CPU set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={need} before importing jax")
        devices = avail[:need]
    devices = list(devices)
    if len(devices) != need:
        raise ValueError(f"make_mesh: data×sx×sy×sz = {'×'.join(map(str, shape))} = {need} "
                         f"≠ {len(devices)} devices given")
    if need == len(jax.devices()) and devices == list(jax.devices()):
        # Let jax order the devices for the physical topology (TPU ICI rings, GPU NVLink).
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 4)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES,
                axis_types=(AxisType.Auto,) * 4)


def spatial_shape(mesh: Mesh) -> tuple[int, int, int]:
    """Devices along ``("x", "y", "z")``."""
    return tuple(int(mesh.shape[a]) for a in SPATIAL)


def volume_spec(ndim: int = 3) -> P:
    """PartitionSpec of an image/activation ``(B, X, Y, Z, C)`` (2D: ``(B, X, Y, C)``)."""
    return P(DATA, *SPATIAL[:ndim], None)


def label_spec(ndim: int = 3) -> P:
    """PartitionSpec of an integer label volume ``(B, X, Y, Z)`` (2D: ``(B, X, Y)``)."""
    return P(DATA, *SPATIAL[:ndim])


def sharding(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def _spec_for(array_ndim: int, spatial_ndim: int) -> P:
    if array_ndim == spatial_ndim + 2:
        return volume_spec(spatial_ndim)
    if array_ndim == spatial_ndim + 1:
        return label_spec(spatial_ndim)
    raise ValueError(f"shard: cannot infer a spec for a rank-{array_ndim} array with "
                     f"{spatial_ndim} spatial dims; expected (B, *spatial[, C])")


def shard(mesh: Mesh, array, spec: P | None = None, spatial_ndim: int = 3) -> jax.Array:
    """Put a host (or single-device) array onto the mesh; infers volume/label spec by rank.

    A spatial axis that does not split evenly over its devices is kept whole on each of them
    (:func:`placement_spec`); the partitioned step pads and splits it (parallel/uneven.py).
    """
    spec = _spec_for(np.ndim(array), spatial_ndim) if spec is None else spec
    check_divisible(np.shape(array), mesh, levels=0, spec=spec)
    return jax.device_put(array, NamedSharding(mesh, placement_spec(np.shape(array), mesh, spec)))


def placement_spec(shape: Sequence[int], mesh: Mesh, spec: P) -> P:
    """``spec`` without the mesh axes that do not split their array axis evenly: how an
    unevenly sized global array can live on the mesh (jax arrays split evenly only)."""
    return P(*(None if name is not None and int(shape[dim]) % int(mesh.shape[name]) else name
               for dim, name in enumerate(spec)))


def _nearest_ok(size: int, multiple: int) -> str:
    lo = (size // multiple) * multiple
    hi = lo + multiple
    return " or ".join(str(s) for s in (lo, hi) if s > 0)


def check_divisible(shape: Sequence[int], mesh: Mesh, levels: int, spec: P | None = None) -> None:
    """Every spatial axis must pool evenly (a multiple of 2**levels), the batch must split
    evenly over the "data" devices.

    ``levels`` is the number of 2× poolings. A spatial axis that does not split evenly over
    its devices is fine: the partitioned step pads it to the next multiple of
    devices × 2**levels and masks the padding (parallel/uneven.py).
    """
    shape = tuple(int(s) for s in shape)
    if spec is None:
        if len(shape) not in (4, 5):
            raise ValueError(f"check_divisible: expected a volume shape (B, X, Y[, Z], C), "
                             f"got {shape}")
        spec = volume_spec(len(shape) - 2)
    if len(spec) > len(shape):
        raise ValueError(f"check_divisible: shape {shape} has rank {len(shape)}, "
                         f"but the partition spec {spec} names {len(spec)} axes")
    for dim, (size, name) in enumerate(zip(shape, spec)):
        if name is None:
            continue
        n = int(mesh.shape[name])
        if name in SPATIAL and size % 2 ** levels:
            raise ValueError(f"shape {shape}: axis {dim} (mesh axis '{name}') has size {size}, "
                             f"not a multiple of {2 ** levels} (2^{levels} poolings; no mesh "
                             f"can run it, one device neither); nearest sizes that work: "
                             f"{_nearest_ok(size, 2 ** levels)}")
        if name not in SPATIAL and size % n:
            raise ValueError(f"shape {shape}: axis {dim} (mesh axis '{name}') has size {size}, "
                             f"not a multiple of {n} ({n} device(s): every device needs "
                             f"whole samples); nearest sizes that work: {_nearest_ok(size, n)}")


def devices_used(shape: Sequence[int], backend_name: str) -> tuple[int, ...]:
    """``(data, sx, sy, sz)`` devices a backend really uses on a mesh of that shape."""
    return (1,) * len(shape) if backend(backend_name).one_device else tuple(shape)


@dataclass(frozen=True)
class Layout:
    """Where and how a network runs: ``mesh`` (the devices it really uses) and ``backend``.

    Made once per run with :func:`layout`; steps, batches and predictors take it instead of
    re-deciding from a (mesh, backend-name) pair.
    """
    mesh: Mesh
    backend: Backend

    @property
    def data(self) -> int:
        return int(self.mesh.shape[DATA])

    @property
    def spatial(self) -> tuple[int, int, int]:
        return spatial_shape(self.mesh)

    def spmd(self, fn: Callable, in_specs, out_specs) -> Callable:
        """Wrap a per-shard function: ``jax.shard_map`` over the mesh for a shard-map backend,
        in its default mode (``check_vma=True``: jax tracks which mesh axes each value varies
        over and sums a replicated input's gradient over the mesh; halo.py's ops see the mesh
        axes bound and exchange margins); otherwise ``fn`` itself, run on global arrays
        (halo.py's ops are then the plain ops)."""
        if self.backend.shard_map:
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
        return fn

    def constrain(self, x, spec: P):
        """Inside jit: pin ``x`` to ``spec`` where the backend partitions from constraints."""
        if self.backend.constrain:
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
        return x

    def sharding(self, spec: P, shape: Sequence[int] | None = None) -> NamedSharding:
        """``spec`` on the mesh; with ``shape``, an axis that does not split evenly is kept
        whole on its devices (:func:`placement_spec`; the step splits it, padded)."""
        if shape is not None:
            spec = placement_spec(shape, self.mesh, spec)
        return NamedSharding(self.mesh, spec)

    def shard(self, array, spec: P | None = None, spatial_ndim: int = 3) -> jax.Array:
        return shard(self.mesh, array, spec, spatial_ndim)


def spmd(fn: Callable, mesh: Mesh, backend_name: str, in_specs, out_specs) -> Callable:
    """:meth:`Layout.spmd` of a backend on a mesh as given (per-shard tests and notebooks)."""
    return Layout(mesh, backend(backend_name)).spmd(fn, in_specs, out_specs)


def layout(mesh: Mesh, backend_name: str) -> Layout:
    """The :class:`Layout` of a backend on a mesh (``"none"`` collapses it to its first device)."""
    b = backend(backend_name)
    if b.one_device:
        mesh = make_mesh((1, 1, 1), 1, devices=[mesh.devices.flat[0]])
    return Layout(mesh, b)
