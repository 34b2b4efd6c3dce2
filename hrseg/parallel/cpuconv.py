"""A faster formulation of the 3D convolution for XLA:CPU (issue 16).

XLA:CPU's native 3D convolution is slow (one 3³ conv 64³ × 32 -> 32: 0.51 s forward, 0.50 s
input gradient, 0.80 s weight gradient on the 2-core machine), while its 2D convolution of
*one large image* is fast (a 3×3 conv of a 512² × 32 image: 0.04 s). So a VALID 3D conv is
written as ``kh`` 2D convs, one per tap along Y, all over the same *wide* image whose rows are
the depth axis (B·X', batches stacked) and whose columns are the (Y', Z') planes side by side
— ``xp`` itself, reshaped for free:

    img[(n, x'), (y', z')] = xp[n, x', y', z']
    y[n, x, y, z]          = Σ_b  conv2d(img, w[:, b])[(n, x + kd//2), (y + b, z + kw//2)]

the 2D conv padded by (kd//2, kw//2) so that each output is computed from its own plane; rows
and columns that straddle two planes or batches are computed and dropped (the padding rows
and columns of ``xp`` separate them), and the ``kh`` outputs are summed shifted by ``b``
planes in one pass. Measured on one conv as above: forward 0.20 s. A custom VJP writes the
input gradient the same way (the full conv of the zero-padded output gradient with the
flipped, in/out-swapped kernel); the weight gradient is kd·kh matmuls over the flattened
voxels against the kw lags of the gradient (``_flat_wgrad``: 0.48 s against XLA's
backprop-filter conv's 0.62 s, for a transient of ~4× the activation; XLA's below 16 input
channels, where it is faster). The sums are the same; only the order of float
additions differs (~1e-6 relative to XLA's conv).

It replaces XLA's conv for VALID, stride-1, ungrouped 3D convolutions with odd depth and width
kernels (not 1×1×1) whenever JAX runs on the CPU (``enabled()``; ``HRSEG_CPU_CONV=0`` turns it
off); accelerators, depthwise and strided convolutions keep ``lax.conv_general_dilated``.
"""
from __future__ import annotations

import contextlib
import os
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from hrseg.parallel.exchange import cotangent_like, varying, zero_pad

ENV = "HRSEG_CPU_CONV"
DN = ("NHWC", "HWIO", "NHWC")
# the weight gradient as matmuls from this many input channels; XLA's below (64³ × Cin -> 32,
# benchmarks/cpuconv.py: Cin 1 0.18 vs 0.066 s, 4 0.23 vs 0.16, 8 0.27 vs 0.24, 16 0.37 vs 0.39)
FLAT_WGRAD_MIN_CIN = 16
_generic = [False]   # set while tracing under generic()


@contextlib.contextmanager
def generic():
    """Trace with XLA's own conv inside this block, as on an accelerator: memory figures
    compiled or traced on the CPU (hrseg.memory) stand for what a GPU/TPU step keeps, not for
    the stacked copies of this CPU-only formulation."""
    prev, _generic[0] = _generic[0], True
    try:
        yield
    finally:
        _generic[0] = prev


def enabled() -> bool:
    """True when the wide-image formulation replaces XLA's 3D conv: JAX's default backend is
    the CPU, ``HRSEG_CPU_CONV`` is not ``0`` and no :func:`generic` block is open.

    Selected by default on the CPU: the 64³ mtf training step 0.48× (inference 0.37×) the
    time of XLA's own conv, paired in one 4-round ``benchmarks/speed.py --generic`` run."""
    return (not _generic[0] and os.environ.get(ENV, "1") != "0"
            and jax.default_backend() == "cpu")


def applies(w_shape, strides, groups: int) -> bool:
    """Whether :func:`valid_conv3d` handles this conv: 3D, stride 1, ungrouped, odd depth and
    width kernels (centred padding of the 2D conv), not 1×1×1 (a plain matmul)."""
    return (len(w_shape) == 5 and groups == 1 and all(s == 1 for s in strides)
            and w_shape[0] % 2 == 1 and w_shape[2] % 2 == 1 and tuple(w_shape[:3]) != (1, 1, 1))


def _wide_conv(xp, w, precision):
    """The forward formulation (module docstring), no custom VJP."""
    kd, kh, kw, cin, cout = w.shape
    B, Xp, Yp, Zp, _ = xp.shape
    X, Y, Z = Xp - kd + 1, Yp - kh + 1, Zp - kw + 1
    pd, pw = kd // 2, kw // 2
    img = xp.reshape(1, B * Xp, Yp * Zp, cin)                        # (1, B·X', Y'·Z', Cin)
    out = None
    for b in range(kh):
        y = lax.conv_general_dilated(img, w[:, b], (1, 1), ((pd, pd), (pw, pw)),
                                     dimension_numbers=DN, precision=precision)
        y = y.reshape(B, Xp, Yp, Zp, cout)[:, pd:pd + X, b:b + Y, pw:pw + Z]
        out = y if out is None else out + y                          # (B, X, Y, Z, Cout)
    return out


def _flat_wgrad(xp, g, kshape, precision):
    """The weight gradient ``dw[a, b, c] = Σ_j xf[j + a·P + b·Z' + c] ⊗ gf[j]``: ``xf`` is
    ``xp`` flattened to voxels (P = Y'·Z' per plane), ``gf`` the output gradient placed on the
    same padded grid (zeros elsewhere), up to its last voxel — so every window of ``xf`` lies
    inside it, unpadded. The kw lags of ``gf`` are stacked along channels once (3× the
    gradient); each (a, b) is then one matmul over contiguous row windows."""
    kd, kh, kw, cin, cout = kshape
    B, Xp, Yp, Zp, _ = xp.shape
    X, Y, Z = g.shape[1:4]
    P = Yp * Zp
    n = ((B - 1) * Xp + X - 1) * P + (Y - 1) * Zp + Z + kw - 1   # rows of each window
    gf = zero_pad(g, ((0, 0), (0, Xp - X), (0, Yp - Y), (0, Zp - Z), (0, 0))).reshape(-1, cout)
    gl = zero_pad(gf[:n - kw + 1], ((kw - 1, kw - 1), (0, 0)))
    lags = jnp.concatenate([gl[kw - 1 - c:kw - 1 - c + n] for c in range(kw)], axis=-1)
    xf = xp.reshape(-1, cin)                                # (B·X'·Y'·Z', Cin)
    rows = [lax.dot_general(xf[a * P + b * Zp:a * P + b * Zp + n], lags,
                            (((0,), (0,)), ((), ())), precision=precision)  # (Cin, kw·Cout)
            for a in range(kd) for b in range(kh)]
    dw = jnp.stack(rows).reshape(kd, kh, cin, kw, cout)
    return jnp.transpose(dw, (0, 1, 3, 2, 4))                          # (kd, kh, kw, Cin, Cout)


def valid_conv3d(xp, w, precision=None):
    """VALID stride-1 conv of an already padded ``xp (B, X+kd-1, Y', Z', Cin)`` with
    ``w (kd, kh, kw, Cin, Cout)`` -> ``(B, X, Y'-kh+1, Z'-kw+1, Cout)``, as ``kh`` 2D convs."""
    return _conv(xp, w, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(xp, w, precision):
    return _wide_conv(xp, w, precision)


def _conv_fwd(xp, w, precision):
    return _wide_conv(xp, w, precision), (xp, w)


def _conv_bwd(precision, res, g):
    xp, w = res
    kd, kh, kw = w.shape[:3]
    gp = zero_pad(g, ((0, 0), (kd - 1, kd - 1), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    dxp = _wide_conv(gp, jnp.flip(w, (0, 1, 2)).swapaxes(3, 4), precision)  # full conv
    if w.shape[3] >= FLAT_WGRAD_MIN_CIN:
        dw = _flat_wgrad(xp, g, w.shape, precision)
    else:                                                        # XLA's backprop-filter conv
        _, filter_vjp = jax.vjp(lambda w: lax.conv_general_dilated(
            xp, w, (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=precision), w)
        (dw,) = filter_vjp(g)
    # check_vma: a replicated w's gradient from per-shard activations is psum'd, as autodiff
    return cotangent_like(dxp, varying(xp)), cotangent_like(dw, varying(w))


_conv.defvjp(_conv_fwd, _conv_bwd)
