"""Per-shard ops for ``jax.shard_map``: each equals the unpartitioned op on the global array.

Inside ``shard_map`` over a partition.make_mesh mesh, spatial array axis 1/2/3 of an activation
``(B, X, Y, Z, C)`` is split over mesh axis "x"/"y"/"z". Before a convolution each shard
receives the margins (half the kernel) of its neighbours by ``lax.ppermute``; shards on the
volume's outer faces receive nothing, i.e. zeros — exactly SAME zero padding. Autodiff of
ppermute is the reverse ppermute, so halo gradients flow back to the neighbour that sent them.

Called with no mesh axis bound (plain jit, gspmd, one device) every op is the plain op: the
"exchange" is just zero padding, with no communication.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

SPATIAL = ("x", "y", "z")
ALL = ("data", "x", "y", "z")


def axis_size(name: str) -> int | None:
    """Devices along a mesh axis bound by an enclosing shard_map, or None when unbound."""
    try:
        return int(lax.axis_size(name))
    except NameError:
        return None


def bound(names: Sequence[str]) -> tuple[str, ...]:
    """The subset of ``names`` that are bound mesh axes of more than one device."""
    return tuple(n for n in names if (axis_size(n) or 1) > 1)


def psum(x, names: Sequence[str] = ALL):
    """Sum over the bound mesh axes among ``names``; identity outside shard_map.

    Size-1 axes are included (free) so shard_map can prove the result replicated.
    """
    names = tuple(n for n in names if axis_size(n) is not None)
    return lax.psum(x, names) if names else x


def _axes_for(x, axes: Sequence[str | None] | None) -> tuple[str | None, ...]:
    nsp = x.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(f"expected an activation (B, X, Y[, Z], C) of rank 4 or 5, "
                         f"got shape {tuple(x.shape)}")
    axes = SPATIAL[:nsp] if axes is None else tuple(axes)
    if len(axes) != nsp:
        raise ValueError(f"axes {axes} name {len(axes)} mesh axes for {nsp} spatial dims "
                         f"of shape {tuple(x.shape)}")
    return axes


def _shift_from(x, dim: int, name: str, n: int, hop: int, take: int, lower: bool):
    """The ``take`` margin rows that the shard ``hop`` steps below (lower) / above sends."""
    L = x.shape[dim]
    if lower:  # neighbour below sends its last rows up
        piece = lax.slice_in_dim(x, L - take, L, axis=dim)
        perm = [(i, i + hop) for i in range(n - hop)]
    else:      # neighbour above sends its first rows down
        piece = lax.slice_in_dim(x, 0, take, axis=dim)
        perm = [(i + hop, i) for i in range(n - hop)]
    if not perm:  # the volume ends before that neighbour: all zeros
        return jnp.zeros_like(piece)
    return lax.ppermute(piece, name, perm)


def _exchange_dim(x, dim: int, name: str | None, lo: int, hi: int):
    n = axis_size(name) if name is not None else None
    if not n or n == 1:
        if lo or hi:
            pad = [(0, 0)] * x.ndim
            pad[dim] = (lo, hi)
            x = jnp.pad(x, pad)
        return x
    L = x.shape[dim]
    parts = []
    # Mesh-TF style multi-hop: a halo wider than a shard is gathered from several neighbours.
    for want, lower in ((lo, True), (hi, False)):
        got, hop, side = 0, 1, []
        while got < want:
            take = min(L, want - got)
            side.append(_shift_from(x, dim, name, n, hop, take, lower))
            got, hop = got + take, hop + 1
        parts.append(side[::-1] if lower else side)  # farthest first below, nearest first above
    return jnp.concatenate(parts[0] + [x] + parts[1], axis=dim)


def halo_exchange(x, halo, axes: Sequence[str | None] | None = None):
    """Pad every spatial dim of a shard ``(B, *S, C)`` with its neighbours' margins.

    ``halo``: an int (same on both sides of every dim), one int per dim, or one ``(lo, hi)``
    per dim. Dims are exchanged one after another, each including the margins already
    received, so corner and edge blocks arrive correctly.
    """
    axes = _axes_for(x, axes)
    nsp = len(axes)
    if isinstance(halo, int):
        halo = [(halo, halo)] * nsp
    halo = [(h, h) if isinstance(h, int) else tuple(h) for h in halo]
    if len(halo) != nsp or any(len(h) != 2 or min(h) < 0 for h in halo):
        raise ValueError(f"halo {halo} must give non-negative (lo, hi) for {nsp} spatial dims")
    for d, (name, (lo, hi)) in enumerate(zip(axes, halo)):
        x = _exchange_dim(x, d + 1, name, lo, hi)
    return x


def _dimension_numbers(nsp: int):
    return ("NDHWC", "DHWIO", "NDHWC") if nsp == 3 else ("NHWC", "HWIO", "NHWC")


def same_padding(kernel: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """XLA's SAME padding for sizes divisible by the stride (what every shard has)."""
    out = []
    for k, s in zip(kernel, strides):
        total = max(k - s, 0)
        out.append((total // 2, total - total // 2))
    return out


def conv(x, w, strides: int | Sequence[int] = 1, feature_group_count: int = 1,
         axes: Sequence[str | None] | None = None, precision=None, name: str = "conv"):
    """SAME convolution of a shard ``(B, *S, Cin)`` with ``w (*K, Cin/groups, Cout)``.

    Odd kernels only (1, 3, 5, 7, anisotropic 3×3×1 …): with an even kernel SAME padding is
    asymmetric and depends on the global size, so it is refused.
    """
    axes = _axes_for(x, axes)
    nsp = len(axes)
    if w.ndim != nsp + 2:
        raise ValueError(f"{name}: kernel shape {tuple(w.shape)} does not fit a {nsp}D "
                         f"activation {tuple(x.shape)}; expected (*K[{nsp}], Cin, Cout)")
    kernel = tuple(int(k) for k in w.shape[:nsp])
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"{name}: kernel {kernel} has an even size; SAME conv needs odd "
                         f"kernels (use conv_transpose for k2s2 up-sampling)")
    if x.shape[-1] != w.shape[-2] * feature_group_count:
        raise ValueError(f"{name}: input has {x.shape[-1]} channels but kernel "
                         f"{tuple(w.shape)} with feature_group_count={feature_group_count} "
                         f"expects {w.shape[-2] * feature_group_count}")
    strides = (strides,) * nsp if isinstance(strides, int) else tuple(strides)
    for d, (s, name_) in enumerate(zip(strides, axes)):
        if x.shape[d + 1] % s:
            raise ValueError(f"{name}: shard size {x.shape[d + 1]} on axis {d + 1} "
                             f"(mesh axis '{name_}') is not divisible by stride {s}")
    pads = tuple(same_padding(kernel, strides))
    return _conv(x, w.astype(x.dtype), pads, tuple(axes), strides, feature_group_count,
                 precision)


def _valid_conv(x, w, strides, groups, precision):
    return lax.conv_general_dilated(
        x, w, window_strides=strides, padding="VALID",
        dimension_numbers=_dimension_numbers(x.ndim - 2), feature_group_count=groups,
        precision=precision)


# The backward pass of a halo conv needs its padded input. Saved as is, that is a copy of every
# activation plus its margins (XLA folds a plain pad into the conv, but not a concatenation of
# received halos): at 32³ blocks, ~20 % more residual memory than one device would keep.
# Saving the unpadded input and exchanging the margins again in the backward pass costs one
# more ppermute of a thin slab per conv instead.
@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, w, pads, axes, strides, groups, precision):
    return _valid_conv(halo_exchange(x, pads, axes), w, strides, groups, precision)


def _conv_fwd(x, w, pads, axes, strides, groups, precision):
    return _conv(x, w, pads, axes, strides, groups, precision), (x, w)


def _return_margins(g, dim: int, name: str | None, lo: int, hi: int):
    """Transpose of one dim's exchange: keep the interior of the padded gradient and send the
    margins' gradient back to the neighbours they came from, added onto their edge rows.

    Autodiff of the exchange builds the same sum from slices and padded full-size buffers;
    six of those are alive at the peak of the backward pass. Single-hop halos only.
    """
    n = axis_size(name) if name is not None else None
    L = g.shape[dim] - lo - hi
    interior = lax.slice_in_dim(g, lo, lo + L, axis=dim)
    if not n or n == 1:
        return interior  # the margins were zero padding: their gradient goes nowhere
    for width, start, perm, at in (
            (lo, 0, [(i + 1, i) for i in range(n - 1)], L - lo),  # lower margin -> below
            (hi, lo + L, [(i, i + 1) for i in range(n - 1)], 0)):  # upper margin -> above
        if not width:
            continue
        back = lax.ppermute(lax.slice_in_dim(g, start, start + width, axis=dim), name, perm)
        idx = [0] * g.ndim
        idx[dim] = at
        interior = lax.dynamic_update_slice(
            interior, lax.dynamic_slice(interior, idx, back.shape) + back, idx)
    return interior


def _conv_bwd(pads, axes, strides, groups, precision, res, g):
    x, w = res
    xp, exchange_vjp = jax.vjp(lambda x: halo_exchange(x, pads, axes), x)
    _, conv_vjp = jax.vjp(lambda xp, w: _valid_conv(xp, w, strides, groups, precision), xp, w)
    dxp, dw = conv_vjp(g)
    if all(max(p) <= x.shape[d + 1] for d, p in enumerate(pads)):
        for d in reversed(range(len(axes))):  # exchanged x, y, z in order: undo z, y, x
            dxp = _return_margins(dxp, d + 1, axes[d], *pads[d])
        return dxp, dw
    (dx,) = exchange_vjp(dxp)  # multi-hop halos: let autodiff transpose the exchange
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def max_pool(x, window: int = 2):
    """Non-overlapping max pooling — local to each shard, no communication."""
    nsp = x.ndim - 2
    for d in range(1, nsp + 1):
        if x.shape[d] % window:
            raise ValueError(f"max_pool: shard shape {tuple(x.shape)} axis {d} is not "
                             f"divisible by the window {window}")
    dims = (1,) + (window,) * nsp + (1,)
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, dims, "VALID")


def conv_transpose(x, w, precision=None):
    """Kernel-2 stride-2 transposed conv of a shard ``(B, *S, Cin)``, ``w (2,…,2, Cin, Cout)``.

    Each input voxel writes its own 2×2×2 output block, so it is local. Written as einsum +
    reshape: XLA's transposed conv under GSPMD all-gathers activations for the weight gradient.
    Output voxel ``2i + a`` gets ``x[i] @ w[a]``.
    """
    nsp = x.ndim - 2
    if w.shape[:nsp] != (2,) * nsp or w.ndim != nsp + 2:
        raise ValueError(f"conv_transpose: kernel {tuple(w.shape)} must be (2,)*{nsp} + "
                         f"(Cin, Cout) for a {nsp}D activation {tuple(x.shape)}")
    if x.shape[-1] != w.shape[-2]:
        raise ValueError(f"conv_transpose: input has {x.shape[-1]} channels, kernel "
                         f"{tuple(w.shape)} expects {w.shape[-2]}")
    w = w.astype(x.dtype)
    if nsp == 3:
        y = jnp.einsum("nxyzi,abcio->nxaybzco", x, w, precision=precision)
    else:
        y = jnp.einsum("nxyi,abio->nxaybo", x, w, precision=precision)
    B, *S, _ = x.shape
    return y.reshape(B, *(2 * s for s in S), w.shape[-1])


def conv_transpose_xla(x, w, precision=None):
    """:func:`conv_transpose` through ``lax.conv_transpose`` (what ``nnx.ConvTranspose`` runs),
    equal up to float rounding. For comparisons only (benchmarks): under GSPMD its weight
    gradient all-gathers whole activations."""
    nsp = x.ndim - 2
    dn = ("NDHWC", "DHWIO", "NDHWC") if nsp == 3 else ("NHWC", "HWIO", "NHWC")
    flipped = w[(slice(None, None, -1),) * nsp].astype(x.dtype)
    return lax.conv_transpose(x, flipped, (2,) * nsp, "VALID", dimension_numbers=dn,
                              precision=precision)


def moments(x, axes: Sequence[int] | None = None, mesh_axes: Sequence[str] = ALL):
    """Mean and (biased) variance over array ``axes`` of the *global* tensor, in float32.

    Sums are psum'd over the bound ``mesh_axes`` (spatial for instance/group norm, plus
    "data" for batch norm). Two passes (mean, then centred squares) for accuracy.
    """
    axes = tuple(range(x.ndim - 1)) if axes is None else tuple(axes)
    xf = x.astype(jnp.float32)
    count = 1
    for a in axes:
        count *= x.shape[a]
    count = psum(jnp.float32(count), mesh_axes)
    mean = psum(jnp.sum(xf, axis=axes, keepdims=True), mesh_axes) / count
    var = psum(jnp.sum(jnp.square(xf - mean), axis=axes, keepdims=True), mesh_axes) / count
    return mean, var
