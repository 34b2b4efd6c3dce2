"""Per-shard ops for ``jax.shard_map``: each equals the unpartitioned op on the global array.

Inside ``shard_map`` over a partition.make_mesh mesh, spatial array axis 1/2/3 of an activation
``(B, X, Y, Z, C)`` is split over mesh axis "x"/"y"/"z"; before a convolution each shard
receives its neighbours' margins (exchange.py), and the conv's backward pass sends the margins'
gradients back.

Called with no mesh axis bound (plain jit, gspmd, one device) every op is the plain op: the
"exchange" is just zero padding, with no communication.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from hrseg.parallel import cpuconv, uneven
from hrseg.parallel.exchange import (  # noqa: F401  (re-exported: halo.psum, …)
    after,
    axes_for,
    axis_size,
    bound,
    cotangent_like,
    device_local,
    halo_exchange,
    margins,
    psum,
    return_margins,
    return_tiles,
    varying,
)
from hrseg.parallel.partition import AXES


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
         axes: Sequence[str | None] | None = None, precision=None, name: str = "conv",
         impl: str = "auto"):
    """SAME convolution of a shard ``(B, *S, Cin)`` with ``w (*K, Cin/groups, Cout)``.

    ``impl`` picks the kernel (cpuconv.KERNELS): ``"auto"`` the wide-image formulation where
    JAX runs on the CPU and XLA's conv elsewhere, ``"xla"`` always XLA's, ``"wide"`` always
    the wide-image one (where it applies).

    Odd kernels only (1, 3, 5, 7, anisotropic 3×3×1 …): with an even kernel SAME padding is
    asymmetric and depends on the global size, so it is refused.
    """
    axes = axes_for(x, axes)
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
    if any(k > 1 for k in kernel):  # padding of an uneven shard: zeros, as beyond the border
        x = uneven.zero_padding(x)
    return _conv(x, w.astype(x.dtype), pads, tuple(axes), strides, feature_group_count,
                 precision, cpuconv.check_kernel(impl))


def _valid_conv(x, w, strides, groups, precision, impl):
    if cpuconv.pointwise(impl, w.shape, strides, groups):   # 1×1×1 on the CPU: a matmul,
        y = lax.dot_general(x, w.reshape(w.shape[-2:]), (((x.ndim - 1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=jnp.float32)
        return y.astype(jnp.result_type(x, w))        # float32 sums, as XLA:CPU's conv
    if cpuconv.chosen(impl, w.shape, strides, groups):  # XLA:CPU: issues 16, 33
        return cpuconv.valid_conv3d(x, w, precision,
                                    direct=impl == "auto" and cpuconv.direct_here())
    return lax.conv_general_dilated(
        x, w, window_strides=strides, padding="VALID",
        dimension_numbers=_dimension_numbers(x.ndim - 2), feature_group_count=groups,
        precision=precision)


# The backward pass of a halo conv needs its padded input. Saved as is, that is a copy of every
# activation plus its margins (XLA folds a plain pad into the conv, but not a concatenation of
# received halos): at 32³ blocks, ~20 % more residual memory than one device would keep.
# Saving the unpadded input and exchanging the margins again in the backward pass costs one
# more ppermute of a thin slab per conv instead. Nor does the backward pass form the padded
# input or its gradient (34³ beside a 32³ block, each 1.2× the block, alive beside the
# input's gradient at the peak of the step): it runs the block's own SAME conv backward, as
# one device would, and each received slab's share apart (_lean_bwd).
@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv(x, w, pads, axes, strides, groups, precision, impl):
    if (impl == "auto" and not bound(axes) and len(pads) == 3
            and cpuconv.chosen(impl, w.shape, strides, groups)):
        # nothing to exchange, only zeros around the block: the direct conv reads them in
        # place instead of a padded copy (64³ mtf: the forward's 25 ms of pad copies)
        return cpuconv.same_forward(x, w, pads, precision)
    return _valid_conv(halo_exchange(x, pads, axes), w, strides, groups, precision, impl)


def _conv_fwd(x, w, pads, axes, strides, groups, precision, impl):
    return _conv(x, w, pads, axes, strides, groups, precision, impl), (x, w)


def _conv_bwd(pads, axes, strides, groups, precision, impl, res, g):
    vx, vw = (varying(t) for t in res)  # check_vma: w replicated -> dw psum'd over the mesh
    x, w = (after(t, g) for t in res)  # re-pad and transpose here, not in the forward pass
    single_hop = all(max(p) <= x.shape[d + 1] for d, p in enumerate(pads))
    margin = math.prod(x.shape[d + 1] + sum(p) for d, p in enumerate(pads)) - math.prod(
        x.shape[1:-1])                   # voxels of the margins, per batch row and channel
    lean = margin * x.shape[0] * x.shape[-1] > w.size  # activations, not weights, dominate
    if (single_hop and lean
            and not cpuconv.chosen(impl, w.shape, strides, groups)):
        dx, dw = _lean_bwd(x, w, g, pads, axes, strides, groups, precision)
        return cotangent_like(dx, vx), cotangent_like(dw, vw)
    # the CPU's wide-image conv (its own backward) or multi-hop halos: through the padded input
    xp, exchange_vjp = jax.vjp(lambda x: halo_exchange(x, pads, axes), x)
    _, conv_vjp = jax.vjp(lambda xp, w: _valid_conv(xp, w, strides, groups, precision, impl),
                          xp, w)
    dxp, dw = conv_vjp(g)
    if single_hop:
        dx = return_margins(dxp, pads, axes)
    else:
        (dx,) = exchange_vjp(dxp)  # multi-hop halos: let autodiff transpose the exchange
    return cotangent_like(dx, vx), cotangent_like(dw, vw)


def _lean_bwd(x, w, g, pads, axes, strides, groups, precision):
    """dx, dw of the halo conv without the padded input or its gradient: the padded input is
    the block (zero margins) plus the received slabs (exchange.margins), and the conv is
    linear in it, so its gradients are the block's SAME conv gradients plus each slab's, a
    conv of the few rows of ``g`` that the slab reaches. The slabs' input gradients go back
    to the neighbours they came from (exchange.return_tiles)."""
    nsp = x.ndim - 2
    kernel = w.shape[:nsp]
    padded = [x.shape[d + 1] + sum(pads[d]) for d in range(nsp)]

    def conv_vjp(xs, pad, gs):
        _, vjp = jax.vjp(lambda xs, w: lax.conv_general_dilated(
            xs, w, strides, pad, dimension_numbers=_dimension_numbers(nsp),
            feature_group_count=groups, precision=precision), xs, w)
        return vjp(gs)

    dx, dw = conv_vjp(x, pads, g)          # the block's own SAME conv, as on one device
    tiles = {(tuple([0] + [p[0] for p in pads] + [0]), x.shape): dx}
    for start, slab in margins(x, pads, axes):
        rows, pad = [slice(None)], []       # the rows of g the slab reaches, its padding
        for d in range(nsp):
            a, b, k, s = start[d + 1], start[d + 1] + slab.shape[d + 1], kernel[d], strides[d]
            i0, i1 = max(0, -((k - 1 - a) // s)), min(g.shape[d + 1], (b - 1) // s + 1)
            rows.append(slice(i0, max(i0, i1)))
            pad.append((a - s * i0, s * (i1 - 1) + k - b))
        if any(r.start >= r.stop for r in rows[1:]):   # reaches no output: no gradient
            dslab = jnp.zeros_like(slab)
        else:  # one slab after another (after): each share of dw is a whole kernel
            dslab, dws = conv_vjp(after(slab, dw), pad, g[tuple(rows)])
            dw = dw + dws
        tiles[(start, slab.shape)] = dslab
    return return_tiles(tiles, (x.shape[0], *padded, x.shape[-1]), pads, axes), dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def max_pool(x, window: int = 2):
    """Non-overlapping max pooling — local to each shard, no communication."""
    nsp = x.ndim - 2
    for d in range(1, nsp + 1):
        if x.shape[d] % window:
            raise ValueError(f"max_pool: shard shape {tuple(x.shape)} axis {d} is not "
                             f"divisible by the window {window}")
    return _max_pool(x, window)


def _windowed(x, window: int):
    """``(B, *S, C)`` -> ``(B, S₁/w, w, S₂/w, w, …, C)``: a free reshape."""
    B, *S, C = x.shape
    return x.reshape((B,) + tuple(v for s in S for v in (s // window, window)) + (C,))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, window):
    nsp = x.ndim - 2
    return jnp.max(_windowed(x, window), axis=tuple(range(2, 2 * nsp + 1, 2)))


def _max_pool_fwd(x, window):
    y = _max_pool(x, window)
    return y, (x, y)  # x: the block output, y: the next conv's input — both kept anyway


def _max_pool_bwd(window, res, g):
    """The gradient goes to the first maximum of each window in row-major order (what
    autodiff's select-and-scatter does). Written out elementwise: XLA:CPU expands
    select-and-scatter into index arrays made in the forward pass, 5 int32 per pooled value."""
    x, y = res
    nsp = x.ndim - 2
    xw = _windowed(after(x, g), window)
    taken = jnp.zeros(y.shape, bool)
    pieces = {}
    for off in itertools.product(range(window), repeat=nsp):
        at = (slice(None),) + tuple(v for o in off for v in (slice(None), o)) + (slice(None),)
        hit = (xw[at] == y) & ~taken
        taken = taken | hit
        pieces[off] = jnp.where(hit, g, jnp.zeros((), g.dtype))

    def assemble(prefix, d):  # nest the pieces back into (B, S₁/w, w, …, C)
        if d == nsp:
            return pieces[prefix]
        return jnp.stack([assemble(prefix + (o,), d + 1) for o in range(window)], 2 + d)

    return (cotangent_like(assemble((), 0).reshape(x.shape), varying(x)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv_transpose(x, w, precision=None, impl: str = "auto"):
    """Kernel-2 stride-2 transposed conv of a shard ``(B, *S, Cin)``, ``w (2,…,2, Cin, Cout)``.

    Each input voxel writes its own 2×2×2 output block, so it is local. Written as einsum +
    reshape: XLA's transposed conv under GSPMD all-gathers activations for the weight gradient.
    Output voxel ``2i + a`` gets ``x[i] @ w[a]``. ``impl`` as :func:`conv`'s
    (cpuconv.KERNELS): on the CPU (``"auto"``) or with ``"wide"``, one matmul over the
    flattened voxels, ``(B·ΠS, Cin) @ (Cin, 2^nsp·Cout)``, and an interleave that keeps the
    channels innermost — the same forward bit for bit; the einsum's weight gradient made XLA:CPU
    transpose the cotangent to channels-outermost (64³ step, level-0 up-conv backward: 159 →
    60–79 ms, issue 33). It merges the spatial dims, so only on local arrays (inside
    shard_map, or a one-device process); GSPMD's global arrays get the einsum.
    """
    nsp = x.ndim - 2
    if w.shape[:nsp] != (2,) * nsp or w.ndim != nsp + 2:
        raise ValueError(f"conv_transpose: kernel {tuple(w.shape)} must be (2,)*{nsp} + "
                         f"(Cin, Cout) for a {nsp}D activation {tuple(x.shape)}")
    if x.shape[-1] != w.shape[-2]:
        raise ValueError(f"conv_transpose: input has {x.shape[-1]} channels, kernel "
                         f"{tuple(w.shape)} expects {w.shape[-2]}")
    B, *S, cin = x.shape
    cout = w.shape[-1]
    w = w.astype(x.dtype)
    impl = cpuconv.check_kernel(impl)
    # flattening merges the spatial dims: only on arrays that are local to the device — a
    # shard inside shard_map, or the one device's — not GSPMD's global arrays (an uneven
    # sharded array's weight gradient came out doubled)
    if (impl == "xla" or not device_local()
            or (impl == "auto" and jax.default_backend() != "cpu")):
        if nsp == 3:
            y = jnp.einsum("nxyzi,abcio->nxaybzco", x, w, precision=precision)
        else:
            y = jnp.einsum("nxyi,abio->nxaybo", x, w, precision=precision)
        return y.reshape(B, *(2 * s for s in S), cout)
    # (Cin, 2^nsp · Cout): one matmul over the flattened voxels, the offsets beside the channels
    w2 = jnp.moveaxis(w, -2, 0).reshape(cin, 2 ** nsp * cout)
    y = jnp.dot(x.reshape(-1, cin), w2, precision=precision)      # (B·ΠS, 2^nsp · Cout)
    y = y.reshape(B, *S, *(2,) * nsp, cout)                          # (B, *S, 2, …, 2, Cout)
    # interleave: output voxel 2i + a; the channels stay innermost (a copy of Cout-long rows)
    order = [0] + [k for d in range(nsp) for k in (1 + d, 1 + nsp + d)] + [1 + 2 * nsp]
    return y.transpose(order).reshape(B, *(2 * s for s in S), cout)


def conv_transpose_xla(x, w, precision=None):
    """:func:`conv_transpose` through ``lax.conv_transpose`` (what ``nnx.ConvTranspose`` runs),
    equal up to float rounding. For comparisons only (benchmarks): under GSPMD its weight
    gradient all-gathers whole activations."""
    nsp = x.ndim - 2
    dn = ("NDHWC", "DHWIO", "NDHWC") if nsp == 3 else ("NHWC", "HWIO", "NHWC")
    flipped = w[(slice(None, None, -1),) * nsp].astype(x.dtype)
    return lax.conv_transpose(x, flipped, (2,) * nsp, "VALID", dimension_numbers=dn,
                              precision=precision)


def moments(x, axes: Sequence[int] | None = None, mesh_axes: Sequence[str] = AXES,
            ext=uneven.CURRENT):
    """Mean and (biased) variance over array ``axes`` of the *global* tensor, in float32.

    Sums are psum'd over the bound ``mesh_axes`` (spatial for instance/group norm, plus
    "data" for batch norm). Two passes (mean, then centred squares) for accuracy. Padding of
    an uneven shard (uneven.py: ``ext``, by default the one being traced) is left out of the
    sums and the count.
    """
    axes = tuple(range(x.ndim - 1)) if axes is None else tuple(axes)
    xf = x.astype(jnp.float32)
    mask = uneven.valid_mask(x, ext)   # padding of an uneven shard (None: there is none)
    keep = (lambda v: v) if mask is None else (lambda v: jnp.where(mask, v, 0.0))
    count = psum(uneven.valid_count(x, axes, ext), mesh_axes)
    mean = psum(jnp.sum(keep(xf), axis=axes, keepdims=True), mesh_axes) / count
    var = psum(jnp.sum(keep(jnp.square(xf - mean)), axis=axes, keepdims=True),
               mesh_axes) / count
    return mean, var
