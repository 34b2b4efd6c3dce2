"""Coarse levels on fewer devices: a level whose blocks are thin is gathered along a mesh axis.

Spatial splitting pays at fine levels and costs at coarse ones, where a shard's block is a few
voxels wide and its margins are as large as the block. Inside ``jax.shard_map`` (with the
default ``check_vma=True``) :func:`gather` all-gathers an activation ``(B, X, Y, Z, C)`` along
the chosen mesh axes, so that every device holds the whole extent on them; the value is then
*invariant* over those axes, and halo.py's ops see that from its type (exchange.axes_for): a
conv pads zeros there instead of exchanging, and batch statistics count the gathered axis
once. :func:`scatter` takes each device's own block back. Autodiff: the transpose of the
invariant all-gather is a slice, and that of the slice (an invariant value meeting the varying
``axis_index``) sums the devices' cotangents — so gradients inside a gathered level are whole
and weight gradients are summed over the still-split axes only.

:func:`plan` decides which axes a level gathers: those whose per-device block would be below
``min_block`` voxels (``model.gather_below``). Outside shard_map (gspmd, one device) nothing is
bound and both ops are the identity.
"""
from __future__ import annotations

from collections.abc import Sequence

from jax import lax

from hrseg.parallel.exchange import axis_size, varying
from hrseg.parallel.partition import SPATIAL


def plan(block: Sequence[int], min_block: int, axes: Sequence[str] = SPATIAL,
         devices: Sequence[int] | None = None) -> tuple[str, ...]:
    """Mesh axes (of ``axes``, one per spatial dim of ``block``) a level gathers: those split
    over more than one device whose per-device block ``block[d]`` is below ``min_block``.
    ``devices`` per axis: default the bound mesh axes' sizes (1 outside shard_map)."""
    if devices is None:
        devices = [axis_size(a) or 1 for a in axes]
    return tuple(a for b, a, n in zip(block, axes, devices)
                 if n > 1 and int(b) < int(min_block))


def level_plan(local_shape: Sequence[int], levels: int, min_block: int,
               axes: Sequence[str] = SPATIAL, devices: Sequence[int] | None = None,
               ) -> list[tuple[str, ...]]:
    """:func:`plan` of every level of a U-Net whose input shard is ``local_shape (B, *S, C)``;
    a coarser level gathers at least the axes of the finer one (its blocks are smaller)."""
    spatial = tuple(local_shape[1:-1])
    return [plan([s // 2 ** lv for s in spatial], min_block, axes[:len(spatial)], devices)
            for lv in range(levels)]


def _dim(name: str) -> int:
    return 1 + SPATIAL.index(name)


def gather(x, names: Sequence[str]):
    """``x (B, *S, C)`` with the whole extent on mesh axes ``names`` (invariant over them)."""
    for name in names:
        if name not in varying(x):
            raise ValueError(f"submesh.gather: the activation does not vary over mesh axis "
                             f"'{name}' (already gathered, or shard_map(check_vma=False), "
                             f"which gathered levels do not support)")
        x = lax.all_gather(x, name, axis=_dim(name), tiled=True, to="invarying")
    return x


def scatter(x, names: Sequence[str]):
    """The inverse of :func:`gather`: this device's block along mesh axes ``names``."""
    for name in names:
        d = _dim(name)
        n = axis_size(name)
        if x.shape[d] % n:
            raise ValueError(f"submesh.scatter: size {x.shape[d]} on axis {d} does not split "
                             f"over the {n} devices of mesh axis '{name}'")
        size = x.shape[d] // n
        x = lax.dynamic_slice_in_dim(x, lax.axis_index(name) * size, size, axis=d)
    return x


def whole(x, names: Sequence[str] = SPATIAL) -> frozenset[str]:
    """The mesh axes of ``names`` (bound, more than one device) on which ``x`` holds the whole
    extent: those it does not vary over. Untyped values (``check_vma=False``, outside
    shard_map) vary over nothing known, so nothing is reported whole."""
    v = varying(x)
    if not v:
        return frozenset()
    return frozenset(a for a in names if (axis_size(a) or 1) > 1 and a not in v)
