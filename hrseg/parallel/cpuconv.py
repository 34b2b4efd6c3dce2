"""A faster formulation of the 3D convolution for XLA:CPU (issue 16).

XLA:CPU's native 3D convolution is slow, its backward pass most of all. Stacking the ``kd``
depth-shifted slices of the input along channels (a cheap copy: whole (Y, Z, C) planes) and
multiplying by the weight reshaped ``(kd·Cin, kh·kw·Cout)`` gives, in *one GEMM*, every
in-plane tap's partial product; the output is their sum, each shifted by its tap:

    p[b, x, j', k', (j, k, o)] = Σ_{d, c} xp[b, x + d, j', k', c] · w[d, j, k, c, o]
    y[b, x, j, k, o]           = Σ_{j₀, k₀} p[b, x, j + j₀, k + k₀, (j₀, k₀, o)]

(im2col along depth, K = kd·Cin; the kh·kw shifted adds fuse into one pass). A custom VJP
writes the backward pass the same way: the input gradient is this very formulation applied
to the zero-padded output gradient with the flipped, in/out-swapped kernel; the weight
gradient is XLA's own (its backprop-filter conv is the fastest of the GEMM forms measured).
One 3³ conv 64³ × 32 -> 32, CPU seconds on 2 loaded cores: forward 0.6–0.7 vs XLA's 1.0–1.1,
forward + backward 1.9–2.0 vs 2.3. The sums are the same; only the order of float additions
differs (relative difference ~4e-7 to XLA's conv; the earlier depth-stacked *2D conv* differed
by 1.8e-5, which was the drift of the GSPMD step test).

It replaces XLA's conv for VALID, stride-1, ungrouped 3D convolutions with a depth kernel > 1
when JAX runs on CPU and ``HRSEG_CPU_CONV=1`` (``enabled()``); accelerators, depthwise and strided convolutions keep
``lax.conv_general_dilated``.
"""
from __future__ import annotations

import contextlib
import os
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from hrseg.parallel.exchange import cotangent_like, varying

ENV = "HRSEG_CPU_CONV"
DN = ("NDHWC", "DHWIO", "NDHWC")
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
    """True when the GEMM formulation should replace XLA's 3D conv: asked for with
    ``HRSEG_CPU_CONV=1``, JAX's default backend is the CPU and no :func:`generic` block is open.

    Opt-in: faster per conv (micro-benchmark), but the full 64³ step was 1.61× *slower* than
    with XLA's conv in a paired 4-round benchmarks/speed.py run at load 15-19."""
    return (not _generic[0] and os.environ.get(ENV, "0") == "1"
            and jax.default_backend() == "cpu")


def applies(w_shape, strides, groups: int) -> bool:
    """Whether :func:`valid_conv3d` handles this conv (3D, stride 1, ungrouped, depth > 1)."""
    return (len(w_shape) == 5 and groups == 1 and all(s == 1 for s in strides)
            and w_shape[0] > 1)


def _gemm_conv(xp, w, precision):
    """The forward formulation (module docstring), no custom VJP."""
    kd, kh, kw, cin, cout = w.shape
    _B, Xp, Yp, Zp, _ = xp.shape
    X, Y, Z = Xp - kd + 1, Yp - kh + 1, Zp - kw + 1
    # (B, X, Y', Z', kd·Cin): channel d·Cin + c holds xp[:, x + d, …, c]
    stacked = jnp.concatenate([xp[:, d:d + X] for d in range(kd)], axis=-1)
    w2 = jnp.transpose(w, (0, 3, 1, 2, 4)).reshape(kd * cin, kh * kw * cout)
    p = jnp.dot(stacked, w2, precision=precision)                # (B, X, Y', Z', kh·kw·Cout)
    taps = [p[:, :, j:j + Y, k:k + Z, (j * kw + k) * cout:(j * kw + k + 1) * cout]
            for j in range(kh) for k in range(kw)]
    return sum(taps[1:], taps[0])                                # (B, X, Y, Z, Cout)


def valid_conv3d(xp, w, precision=None):
    """VALID stride-1 conv of an already padded ``xp (B, X+kd-1, Y', Z', Cin)`` with
    ``w (kd, kh, kw, Cin, Cout)`` -> ``(B, X, Y'-kh+1, Z'-kw+1, Cout)``, as one GEMM."""
    return _conv(xp, w, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(xp, w, precision):
    return _gemm_conv(xp, w, precision)


def _conv_fwd(xp, w, precision):
    return _gemm_conv(xp, w, precision), (xp, w)


def _conv_bwd(precision, res, g):
    xp, w = res
    kd, kh, kw = w.shape[:3]
    gp = jnp.pad(g, ((0, 0), (kd - 1, kd - 1), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    dxp = _gemm_conv(gp, jnp.flip(w, (0, 1, 2)).swapaxes(3, 4), precision)  # full conv
    _, filter_vjp = jax.vjp(lambda w: lax.conv_general_dilated(
        xp, w, (1, 1, 1), "VALID", dimension_numbers=DN, precision=precision), w)
    (dw,) = filter_vjp(g)                                        # XLA's backprop-filter conv
    # check_vma: a replicated w's gradient from per-shard activations is psum'd, as autodiff
    return cotangent_like(dxp, varying(xp)), cotangent_like(dw, varying(w))


_conv.defvjp(_conv_fwd, _conv_bwd)
