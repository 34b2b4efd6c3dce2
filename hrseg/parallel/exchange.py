"""The halo exchange between neighbouring shards, and its transpose.

Inside ``jax.shard_map`` over a partition.make_mesh mesh, spatial array axis 1/2/3 of an
activation ``(B, X, Y, Z, C)`` is split over mesh axis "x"/"y"/"z". Before a convolution each
shard receives the margins (half the kernel) of its neighbours by ``lax.ppermute``; shards on
the volume's outer faces receive nothing, i.e. zeros — exactly SAME zero padding. The transpose
sends the margins' gradients back to the neighbours they came from. With no mesh axis bound
(plain jit, gspmd, one device) the exchange is just zero padding.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from hrseg.parallel.partition import AXES, SPATIAL


def axis_size(name: str) -> int | None:
    """Devices along a mesh axis bound by an enclosing shard_map, or None when unbound."""
    try:
        return int(lax.axis_size(name))
    except NameError:
        return None


def device_local() -> bool:
    """Whether arrays traced now are local to one device: inside ``shard_map`` (a mesh axis is
    bound) or in a one-device process — not GSPMD's global arrays, which code that merges
    spatial dims (flat matmuls) or calls C++ on the whole array must not see."""
    return jax.device_count() == 1 or any(axis_size(n) is not None for n in AXES)


def bound(names: Sequence[str]) -> tuple[str, ...]:
    """The subset of ``names`` that are bound mesh axes of more than one device."""
    return tuple(n for n in names if (axis_size(n) or 1) > 1)


def psum(x, names: Sequence[str] = AXES):
    """Sum over the bound mesh axes among ``names``; identity outside shard_map.

    Size-1 axes are included (free) so shard_map can prove the result replicated.
    """
    names = tuple(n for n in names if axis_size(n) is not None)
    if not names:
        return x
    if (v := varying(x)) and (missing := set(names) - v):
        # check_vma: a value varying over some of the axes (a 2D activation on a mesh with a
        # "z" axis) is cast to vary over all of them first, as jax does for an invariant one
        x = lax.pcast(x, mesh_order(missing), to="varying")
    return lax.psum(x, names)


def varying(x) -> frozenset[str]:
    """The mesh axes ``x`` varies over inside ``jax.shard_map`` with ``check_vma=True``
    (its type's varying manual axes); empty outside shard_map and with ``check_vma=False``."""
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def cotangent_like(ct, axes: frozenset[str]):
    """``ct`` cast to its primal's varying axes ``axes``, as a custom VJP must return it.

    A cotangent varying over more axes than its primal (a replicated weight's gradient, made
    from per-shard activations) is summed over the extra ones: the transpose of the implicit
    ``pcast(to="varying")`` that jax inserts where a replicated value meets a varying one, as
    jax's own ops do. One varying over fewer axes is cast up. With ``check_vma=False`` types
    carry no axes and this is the identity (shard_map's transpose sums replicated gradients).
    """
    have = varying(ct)
    if not (have or axes):
        return ct
    if extra := have - axes:
        ct = lax.psum(ct, mesh_order(extra))
    if missing := axes - have:
        ct = lax.pcast(ct, mesh_order(missing), to="varying")
    return ct


def mesh_order(names) -> tuple[str, ...]:
    """``names`` in the enclosing mesh's axis order (one program per set of names)."""
    mesh = jax.sharding.get_abstract_mesh().axis_names
    return tuple(a for a in mesh if a in names) + tuple(sorted(set(names) - set(mesh)))


def axes_for(x, axes: Sequence[str | None] | None) -> tuple[str | None, ...]:
    nsp = x.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(f"expected an activation (B, X, Y[, Z], C) of rank 4 or 5, "
                         f"got shape {tuple(x.shape)}")
    axes = SPATIAL[:nsp] if axes is None else tuple(axes)
    if len(axes) != nsp:
        raise ValueError(f"axes {axes} name {len(axes)} mesh axes for {nsp} spatial dims "
                         f"of shape {tuple(x.shape)}")
    if v := varying(x):  # gathered (submesh.gather): whole on the axes it does not vary over
        axes = tuple(None if a is not None and a not in v else a for a in axes)
    return axes


# While the dims are exchanged one after another, the padded shard is kept as a tree of
# concatenations (_Cat) and materialized once at the end: concatenating dim by dim would make a
# full-size copy per dim (three of them alive at once in a conv's backward pass). The slabs sent
# to the neighbours are thin slices of the tree.

class _Cat:
    """``jnp.concatenate(parts, dim)``, not yet materialized; parts are arrays or _Cats."""

    def __init__(self, dim: int, parts: list):
        self.dim, self.parts, self.dtype = dim, parts, parts[0].dtype
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape = tuple(shape)


def _slice(t, start: int, stop: int, dim: int):
    """Rows ``start:stop`` along ``dim`` of an array or a _Cat, as an array."""
    if not isinstance(t, _Cat):
        return lax.slice_in_dim(t, start, stop, axis=dim)
    if t.dim != dim:
        return jnp.concatenate([_slice(p, start, stop, dim) for p in t.parts], axis=t.dim)
    pieces, at = [], 0
    for p in t.parts:
        lo, hi = max(start, at), min(stop, at + p.shape[dim])
        if lo < hi:
            pieces.append(_slice(p, lo - at, hi - at, dim))
        at += p.shape[dim]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=dim)


def _materialize(t):
    if not isinstance(t, _Cat):
        return t
    return jnp.concatenate([_materialize(p) for p in t.parts], axis=t.dim)


def _shift_from(x, dim: int, name: str, n: int, hop: int, take: int, lower: bool):
    """The ``take`` margin rows that the shard ``hop`` steps below (lower) / above sends."""
    L = x.shape[dim]
    if lower:  # neighbour below sends its last rows up
        piece = _slice(x, L - take, L, dim)
        perm = [(i, i + hop) for i in range(n - hop)]
    else:      # neighbour above sends its first rows down
        piece = _slice(x, 0, take, dim)
        perm = [(i + hop, i) for i in range(n - hop)]
    if not perm:  # the volume ends before that neighbour: all zeros
        return jnp.zeros_like(piece)
    return lax.ppermute(piece, name, perm)


def zero_pad(x, widths):
    """``x`` with ``widths[d] = (lo, hi)`` zeros on each side of dim ``d``, as one ``lax.pad``:
    ``jnp.pad`` took 3.7 ms of tracing per call (cProfile, 124 calls in the 64³ mtf step)."""
    return lax.pad(x, jnp.zeros((), x.dtype), [(lo, hi, 0) for lo, hi in widths])


def _exchange_dim(x, dim: int, name: str | None, lo: int, hi: int):
    """``x`` (array or _Cat) with ``lo``/``hi`` margin rows along ``dim``, as a _Cat."""
    n = axis_size(name) if name is not None else None
    if not n or n == 1:
        if not (lo or hi):
            return x
        if not isinstance(x, _Cat):  # plain zero padding: XLA folds it into the conv
            pad = [(0, 0)] * x.ndim
            pad[dim] = (lo, hi)
            return zero_pad(x, pad)
        zeros = [jnp.zeros(x.shape[:dim] + (w,) + x.shape[dim + 1:], x.dtype)
                 for w in (lo, hi)]
        return _Cat(dim, zeros[:1] * bool(lo) + [x] + zeros[1:] * bool(hi))
    L = x.shape[dim]
    if n == 2 and lo == hi and 0 < lo <= L:
        # A 2-way axis: each shard has one neighbour, which wants the rows facing it, so both
        # margins travel in one ppermute (on fake CPU devices a collective costs ~0.2–0.4 ms
        # whatever its size; issue 33 §2). Shard 0 gets its upper margin, shard 1 its lower.
        first = lax.axis_index(name) == 0
        got = lax.ppermute(jnp.where(first, _slice(x, L - lo, L, dim), _slice(x, 0, lo, dim)),
                           name, [(0, 1), (1, 0)])
        zeros = jnp.zeros_like(got)
        return _Cat(dim, [jnp.where(first, zeros, got), x, jnp.where(first, got, zeros)])
    parts = []
    # Mesh-TF style multi-hop: a halo wider than a shard is gathered from several neighbours.
    for want, lower in ((lo, True), (hi, False)):
        got, hop, side = 0, 1, []
        while got < want:
            take = min(L, want - got)
            side.append(_shift_from(x, dim, name, n, hop, take, lower))
            got, hop = got + take, hop + 1
        parts.append(side[::-1] if lower else side)  # farthest first below, nearest first above
    return _Cat(dim, parts[0] + [x] + parts[1])


def halo_exchange(x, halo, axes: Sequence[str | None] | None = None):
    """Pad every spatial dim of a shard ``(B, *S, C)`` with its neighbours' margins.

    ``halo``: an int (same on both sides of every dim), one int per dim, or one ``(lo, hi)``
    per dim. Dims are exchanged one after another, each including the margins already
    received, so corner and edge blocks arrive correctly.
    """
    axes = axes_for(x, axes)
    for d, (name, (lo, hi)) in enumerate(zip(axes, _pairs(halo, len(axes)))):
        x = _exchange_dim(x, d + 1, name, lo, hi)
    return _materialize(x)


def _pairs(halo, nsp: int) -> list[tuple[int, int]]:
    if isinstance(halo, int):
        halo = [(halo, halo)] * nsp
    halo = [(h, h) if isinstance(h, int) else tuple(h) for h in halo]
    if len(halo) != nsp or any(len(h) != 2 or min(h) < 0 for h in halo):
        raise ValueError(f"halo {halo} must give non-negative (lo, hi) for {nsp} spatial dims")
    return halo


def margins(x, halo, axes: Sequence[str | None] | None = None):
    """What :func:`halo_exchange` receives, without forming the padded shard: a list of
    ``(start, slab)``, ``slab`` the box of the padded shard that begins at index ``start``.

    One slab per side of each dim exchanged with neighbours (one per hop when a margin is
    wider than a shard), in exchange order: dim d's slabs span the padded extent of the dims
    before it (corners included) and the block of the dims after it, so with ``x`` they tile
    the padded shard, but for the zero rows of dims that are not split.
    """
    axes = axes_for(x, axes)
    nd = x.ndim
    halo = _pairs(halo, len(axes))
    t, out = _Cat(1, [x]), []   # a _Cat from the start: a dim not split adds zero slabs, no copy
    for d, (name, (lo, hi)) in enumerate(zip(axes, halo)):
        inner, t = t, _exchange_dim(t, d + 1, name, lo, hi)
        if name is None or (axis_size(name) or 1) == 1 or not (lo or hi):
            continue
        start = [0] * nd
        for e in range(d + 2, nd - 1):      # the dims after d: their block only
            start[e] = halo[e - 1][0]
        at = 0
        for p in t.parts:
            if p is not inner:
                start[d + 1] = at
                out.append((tuple(start), _materialize(p)))
            at += p.shape[d + 1]
    return out


def after(x, g):
    """``x``, made to depend on the cotangent ``g`` (``x + 0·g₀``, one fused multiply-add).

    A backward pass recomputes things from what the forward pass saved (the padded input of a
    conv, in-place ABN's x̂, the transposed copies XLA makes for weight gradients). Work that
    depends on forward values only may be scheduled right after the forward op — XLA:CPU's
    default scheduler does — and then lives as long as the saved tensors, undoing the saving.
    Tied to ``g`` it can only run when the backward pass reaches it. XLA keeps ``0·g`` for
    floats (it is NaN when g is), so the tie is not simplified away.
    """
    first = g[(0,) * g.ndim]  # one element (no ravel: under GSPMD that would gather g)
    return x + (0 * first).astype(x.dtype)


def return_margins(dxp, pads, axes):
    """Transpose of :func:`halo_exchange` (single-hop): the interior of the padded gradient,
    plus the margins' gradients sent back to the neighbours they came from and added onto
    their edge rows — undoing z, then y, then x, as the exchange did x, y, z.

    The running sum is kept as ``dxp`` plus a list of thin received slabs placed at offsets
    (``adds``); only the slabs to send are formed along the way, and the result is one slice
    of ``dxp`` with the slabs added in place. Autodiff of the exchange, or cropping dim by dim,
    would make a full-size buffer per dim (alive together at the peak of the backward pass).
    """
    return _return(dxp.shape, lambda lo, shape: lax.slice(
        dxp, lo, [a + b for a, b in zip(lo, shape)]), pads, axes)


def return_tiles(tiles, shape, pads, axes):
    """:func:`return_margins` of a padded gradient of ``shape`` given as tiles: ``tiles
    [(start, tile_shape)]``, the interior box and each slab of :func:`margins` (single-hop),
    formed apart; the padded gradient itself is never formed."""
    return _return(shape, lambda lo, s: tiles[(tuple(lo), tuple(s))], pads, axes)


def _return(shape, base, pads, axes):
    """The single-hop transpose on a padded gradient of ``shape`` whose box ``(lo, shape)``
    is ``base(lo, shape)`` (asked only for the margins' boxes and the interior)."""
    nd = len(shape)
    start, size = [0] * nd, list(shape)        # the current crop, in dxp's coordinates
    adds = []                                  # (slab, its first index in dxp's coordinates)

    def region(lo, shape):
        """The running sum on the box ``lo`` + ``shape``."""
        out = base(lo, shape)
        for slab, at in adds:
            a = [max(p, q) for p, q in zip(lo, at)]
            b = [min(p + m, q + n) for p, m, q, n in zip(lo, shape, at, slab.shape)]
            if any(u >= v for u, v in zip(a, b)):
                continue
            piece = lax.slice(slab, [u - q for u, q in zip(a, at)], [v - q for v, q in zip(b, at)])
            idx = [u - p for u, p in zip(a, lo)]
            out = lax.dynamic_update_slice(out, lax.dynamic_slice(out, idx, piece.shape) + piece,
                                           idx)
        return out

    for d in reversed(range(1, nd - 1)):
        lo, hi = pads[d - 1]
        n = axis_size(axes[d - 1]) if axes[d - 1] is not None else None
        L = size[d] - lo - hi
        if n == 2 and lo == hi and lo:   # a 2-way axis: both sides in one ppermute
            low, high = list(start), list(start)
            high[d] = start[d] + lo + L
            box = list(size)
            box[d] = lo
            first = lax.axis_index(axes[d - 1]) == 0   # shard 0 sends its upper margin up,
            back = lax.ppermute(jnp.where(first, region(high, box), region(low, box)),
                                axes[d - 1], [(0, 1), (1, 0)])   # shard 1 its lower one down
            zeros = jnp.zeros_like(back)
            at0, at1 = list(start), list(start)       # onto shard 0's last rows, shard 1's first
            at0[d], at1[d] = start[d] + L, start[d] + lo
            adds += [(jnp.where(first, back, zeros), at0), (jnp.where(first, zeros, back), at1)]
        elif n and n > 1:
            for width, first, perm, to in (
                    (lo, start[d], [(i + 1, i) for i in range(n - 1)], start[d] + L),
                    (hi, start[d] + lo + L, [(i, i + 1) for i in range(n - 1)], start[d] + lo)):
                if not width:
                    continue
                box_lo, box = list(start), list(size)
                box_lo[d], box[d] = first, width
                back = lax.ppermute(region(box_lo, box), axes[d - 1], perm)
                at = list(start)
                at[d] = to  # lower margin -> the last rows below, upper -> the first above
                adds.append((back, at))
        start[d], size[d] = start[d] + lo, L   # the margins were zero padding when unbound
    return region(start, size)
