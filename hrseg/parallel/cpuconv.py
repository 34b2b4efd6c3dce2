"""A faster formulation of the 3D convolution for XLA:CPU (issue 16).

XLA:CPU's native 3D convolution is slow, its backward pass most of all (one 3³ conv
64³ × 32 -> 32: 1.0 s forward, 6.3 s forward + backward on this machine). Stacking the ``kd``
depth-shifted slices of the input along channels turns the same sum into *one 2D convolution*
over (Y, Z) with ``kd · Cin`` input channels and the depth axis folded into the batch:

    y[b, x, :, :, o] = Σ_{d, j, k, c} xp[b, x + d, j, k, c] · w[d, j, k, c, o]
                     = conv2d(stack_d xp[b, x + d], w reshaped (kh, kw, kd·Cin, Cout))

which XLA:CPU runs (and differentiates) through its fast 2D path: 0.9 s / 1.5–2.9 s for the
conv above (/tmp micro-benchmark, 2 shared cores, noisy). The sum is the same; only the order
of float additions differs (fp32 round-off, ~1e-6 relative).

It is used, when asked for with ``HRSEG_CPU_CONV=1`` (``enabled()``), for VALID, stride-1,
ungrouped 3D convolutions with a depth kernel > 1 when JAX runs on CPU; accelerators,
depthwise and strided convolutions keep ``lax.conv_general_dilated``.
"""
from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
from jax import lax

ENV = "HRSEG_CPU_CONV"
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
    """True when the depth-stacked formulation should replace XLA's 3D conv: asked for with
    ``HRSEG_CPU_CONV=1``, JAX's default backend is the CPU and no :func:`generic` block is open.

    Off by default: its speed-up was not settled by the measurements so far (0.80× and 1.34×
    the step time of XLA's conv in two runs on shared cores), and a 3-step GSPMD run on 8 fake
    devices drifted 9.5e-5 (relative loss) from the one-device run with it, against < 2e-5
    without (tests/multidevice/test_step_sharded.py)."""
    return (not _generic[0] and os.environ.get(ENV, "0") == "1"
            and jax.default_backend() == "cpu")


def applies(w_shape, strides, groups: int) -> bool:
    """Whether :func:`valid_conv3d` handles this conv (3D, stride 1, ungrouped, depth > 1)."""
    return (len(w_shape) == 5 and groups == 1 and all(s == 1 for s in strides)
            and w_shape[0] > 1)


def valid_conv3d(xp, w, precision=None):
    """VALID stride-1 conv of an already padded ``xp (B, X+kd-1, Y', Z', Cin)`` with
    ``w (kd, kh, kw, Cin, Cout)`` -> ``(B, X, Y'-kh+1, Z'-kw+1, Cout)``, as one 2D conv."""
    kd, kh, kw, cin, cout = w.shape
    B, Xp, Yp, Zp, _ = xp.shape
    X = Xp - kd + 1
    # (B, X, Y', Z', kd·Cin): channel d·Cin + c holds xp[:, x + d, …, c]
    stacked = jnp.concatenate([xp[:, d:d + X] for d in range(kd)], axis=-1)
    stacked = stacked.reshape(B * X, Yp, Zp, kd * cin)
    w2 = jnp.transpose(w, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * cin, cout)
    y = lax.conv_general_dilated(stacked, w2, (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=precision)              # (B·X, Y, Z, Cout)
    return y.reshape(B, X, *y.shape[1:])
