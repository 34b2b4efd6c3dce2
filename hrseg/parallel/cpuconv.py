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
planes in one pass. Measured on one conv as above: forward 0.20 s. Up to 32 output channels
the ``kh`` taps are one 2D conv with the taps stacked along its outputs (a wider matmul).
A custom VJP writes the input gradient the same way (``_input_grad``: the full conv of the
output gradient with the in/out-swapped kernel, flipped; the image is the gradient padded
along X and Z only, 11 % fewer positions than padding it by k-1 on every side: the 64³ step
0.94× in a paired A/B); the weight gradient is kd·kh matmuls over the flattened voxels
against the kw lags of the gradient (``_flat_wgrad``: 0.48 s against XLA's backprop-filter
conv's 0.62 s, for a transient of 3× the gradient plus one window: each window is copied
only after the previous matmul (``after``; all at once, the 64³ mtf step's XLA temp was 1218
MiB, now 948, the step 0.98× in a paired A/B); XLA's below 16 input channels, where it is
faster). A conv whose window holds no more values than it has output channels (the
network's first conv, 1 -> 32) is a sum of broadcast taps instead (``_tap_sum``: 15 vs
60 ms at 64³). The sums are the same; only the order of float additions differs (~1e-6
relative to XLA's conv). 16-bit inputs are summed in float32 and rounded once, as XLA's conv
and the direct conv (parallel/native.py) do.

It replaces XLA's conv for VALID, stride-1, ungrouped 3D convolutions with odd depth and width
kernels (not 1×1×1) when a network is built with ``model.conv: auto`` (the default) and JAX
runs on the CPU, or with ``model.conv: wide``; ``model.conv: xla`` keeps XLA's everywhere
(:func:`chosen`). Accelerators, depthwise and strided convolutions keep
``lax.conv_general_dilated``.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from hrseg.parallel import native
from hrseg.parallel.exchange import (
    after,
    cotangent_like,
    device_local,
    varying,
    zero_pad,
)

DN = ("NHWC", "HWIO", "NHWC")
# the weight gradient as matmuls from this many input channels; XLA's below (64³ × Cin -> 32,
# benchmarks/cpuconv.py: Cin 1 0.18 vs 0.066 s, 4 0.23 vs 0.16, 8 0.27 vs 0.24, 16 0.37 vs 0.39)
FLAT_WGRAD_MIN_CIN = 16
# taps stacked into one 2D conv up to this many output channels (a 3× wider matmul; 64³ mtf
# paired A/B, 6 rounds: inference 0.96×, step 0.995×; at 64 channels 1.01× / 1.01×)
STACK_MAX_COUT = 32
KERNELS = ("auto", "xla", "wide")   # model.conv: the 3D conv kernel a network is built with


def check_kernel(impl: str) -> str:
    if impl not in KERNELS:
        raise ValueError(f"conv kernel '{impl}' is not one of {', '.join(KERNELS)}")
    return impl


def chosen(impl: str, w_shape, strides, groups: int) -> bool:
    """Whether this conv runs as the wide-image formulation: it :func:`applies`, and the kernel
    is ``"wide"``, or ``"auto"`` while JAX's default backend is the CPU. ``hrseg.memory`` builds
    its networks with ``"xla"``: its figures stand for what an accelerator's step keeps, not
    for this CPU-only formulation's stacked copies.

    "auto" on the CPU: the 64³ mtf training step 0.48× (inference 0.37×) the time of XLA's own
    conv, paired in one 4-round ``benchmarks/speed.py --generic`` run."""
    if not applies(w_shape, strides, groups):
        return False
    return impl == "wide" or (impl == "auto" and jax.default_backend() == "cpu")


def pointwise(impl: str, w_shape, strides, groups: int) -> bool:
    """Whether this conv runs as a matmul over the channels: a 1×1×1 (1×1 in 2D), stride-1,
    ungrouped conv with ``"auto"`` on the CPU. XLA:CPU's conv computes such a conv's weight
    gradient through a transposed copy of the activation: the 64³ mtf head's took 33 ms of a
    1.3 s step (benchmarks/step_profile.py), its dot a few."""
    return (impl == "auto" and jax.default_backend() == "cpu" and groups == 1
            and all(k == 1 for k in w_shape[:-2]) and all(s == 1 for s in strides))


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
    for b, y in _taps(img, w, (pd, pw), precision):
        y = y.reshape(B, Xp, Yp, Zp, cout)[:, pd:pd + X, b:b + Y, pw:pw + Z]
        out = y if out is None else out + y                          # (B, X, Y, Z, Cout)
    return out.astype(jnp.result_type(xp, w))   # float32 sums, one rounding, as the direct conv


def _taps(img, w, pads, precision):
    """``(b, conv2d(img, w[:, b]))`` for each tap ``b`` along Y: one 2D conv per tap, or —
    below STACK_MAX_COUT output channels — one conv with the taps stacked along its output
    channels (a wider matmul), sliced apart."""
    kd, kh, kw, cin, cout = w.shape
    pad = tuple((p, p) for p in pads)
    conv = lambda k: lax.conv_general_dilated(img, k, (1, 1), pad, dimension_numbers=DN,
                                              precision=precision,
                                              preferred_element_type=jnp.float32)
    if kh > 1 and cout <= STACK_MAX_COUT:
        y = conv(jnp.moveaxis(w, 1, 3).reshape(kd, kw, cin, kh * cout))  # (1, R, C, kh·Cout)
        return [(b, y[..., b * cout:(b + 1) * cout]) for b in range(kh)]
    return [(b, conv(w[:, b])) for b in range(kh)]


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
    rows = []
    for a in range(kd):
        for b in range(kh):   # each window copied after the previous matmul: one alive at once
            win = xf[a * P + b * Zp:a * P + b * Zp + n]
            rows.append(lax.dot_general(after(win, rows[-1]) if rows else win, lags,
                                        (((0,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32))  # (Cin, kw·Cout)
    dw = jnp.stack(rows).reshape(kd, kh, cin, kw, cout)
    dw = jnp.transpose(dw, (0, 1, 3, 2, 4))                            # (kd, kh, kw, Cin, Cout)
    return dw.astype(jnp.result_type(xp, g))


def valid_conv3d(xp, w, precision=None, direct: bool | None = None):
    """VALID stride-1 conv of an already padded ``xp (B, X+kd-1, Y', Z', Cin)`` with
    ``w (kd, kh, kw, Cin, Cout)`` -> ``(B, X, Y'-kh+1, Z'-kw+1, Cout)``: forward and input
    gradient by the C++ direct conv where ``direct`` (default: :func:`direct_here`), else as
    ``kh`` 2D convs of the wide image."""
    return _conv(xp, w, precision, direct_here() if direct is None else bool(direct))


def direct_here() -> bool:
    """Whether the C++ direct conv (:mod:`hrseg.parallel.native`) runs this conv: it is built
    and loaded, and the arrays are local to a device (inside ``shard_map`` or a one-device
    process; on GSPMD's global arrays the custom call would be gathered to one device)."""
    return native.available() and device_local()


def _few_channels(kshape) -> bool:
    """Convs whose windows hold no more values than their output has channels (the first
    conv of a network, 1 -> 32 channels: 27 terms): as a wide-image 2D conv that would be a
    matmul with only ``kd·kw·Cin`` (9) terms per output (64³: 60 ms, 3 GFLOP/s)."""
    kd, kh, kw, cin, cout = kshape
    return kd * kh * kw * cin <= cout


def _tap_sum(xp, w):
    """``Σ_abci xp[a:, b:, c:, i] · w[a, b, c, i]`` as one elementwise loop over the output,
    every tap a broadcast multiply-add across the output channels (64³, 1 -> 32: 15 ms)."""
    kd, kh, kw, cin, _ = w.shape
    X, Y, Z = (n - k + 1 for n, k in zip(xp.shape[1:4], (kd, kh, kw)))
    out = None
    for a in range(kd):
        for b in range(kh):
            for c in range(kw):
                win = xp[:, a:a + X, b:b + Y, c:c + Z]                     # (B, X, Y, Z, Cin)
                for i in range(cin):
                    t = (win[..., i:i + 1].astype(jnp.float32)
                         * w[a, b, c, i].astype(jnp.float32))           # (B, X, Y, Z, Cout)
                    out = t if out is None else out + t
    return out.astype(jnp.result_type(xp, w))          # float32 sums, as a conv accumulates


def _forward(xp, w, precision, direct):
    if _few_channels(w.shape):
        return _tap_sum(xp, w)
    if direct:
        return native.conv3d(xp, w)
    return _wide_conv(xp, w, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(xp, w, precision, direct):
    return _forward(xp, w, precision, direct)


def _conv_fwd(xp, w, precision, direct):
    return _forward(xp, w, precision, direct), (xp, w)


def _direct_input_grad(g, w):
    """The full conv of ``g`` as the direct VALID conv of ``g`` with ``k-1`` zeros read around
    it on every side (no padded copy), the kernel flipped and its in/out channels swapped."""
    kd, kh, kw = w.shape[:3]
    return native.conv3d(g, jnp.flip(w, (0, 1, 2)).swapaxes(3, 4),
                         ((kd - 1, kd - 1), (kh - 1, kh - 1), (kw - 1, kw - 1)))  # (B, X', …, Cin)


def same_forward(x, w, pads, precision=None):
    """The forward value of the conv of ``x`` padded by ``pads`` (zeros, one ``(lo, hi)`` per
    dim): the direct conv reads the zeros in place where it runs, the padded copy is made
    otherwise. Forward only (the halo conv's own VJP differentiates it)."""
    if direct_here() and not _few_channels(w.shape):
        return native.conv3d(x, w, pads)
    return valid_conv3d(zero_pad(x, ((0, 0), *pads, (0, 0))), w, precision)


def _input_grad(g, w, precision):
    """The full conv ``dxp[i, j, k] = Σ_abc g[i-a, j-b, k-c] w[a, b, c]ᵀ`` over ``xp``'s grid
    ``(B, X+kd-1, Y+kh-1, Z+kw-1)``, as ``kh`` 2D convs of one wide image of ``g`` padded by
    ``kd//2`` rows and ``kw//2`` columns only: with the kernel flipped along X and Z, the
    2D conv's own centred padding and those zeros make each output row and column the full
    conv's (a row or column read past a plane's or batch's edge is a zero of the padding);
    along Y each tap's output is placed ``b`` planes down (zeros elsewhere) and summed. The
    image has ``Y`` planes, not ``Y+2(kh-1)`` — 11 % fewer positions than the same full conv
    written as a VALID conv of ``g`` padded by ``k-1`` on every side (64³, k 3)."""
    kd, kh, kw, cin, cout = w.shape
    B, X, Y, Z, _ = g.shape
    pd, pw = kd // 2, kw // 2
    Xp, Zp = X + 2 * pd, Z + 2 * pw
    gq = zero_pad(g, ((0, 0), (pd, pd), (0, 0), (pw, pw), (0, 0)))  # (B, X', Y, Z', Cout)
    img = gq.reshape(1, B * Xp, Y * Zp, cout)
    wt = jnp.flip(w, (0, 2)).swapaxes(3, 4)                          # (kd, kh, kw, Cout, Cin)
    out = None
    for b, y in _taps(img, wt, (pd, pw), precision):
        y = zero_pad(y.reshape(B, Xp, Y, Zp, cin),
                     ((0, 0), (0, 0), (b, kh - 1 - b), (0, 0), (0, 0)))
        out = y if out is None else out + y                   # (B, X', Y+kh-1, Z', Cin)
    return out.astype(jnp.result_type(g, w))


def _conv_bwd(precision, direct, res, g):
    xp, w = res
    dxp = _direct_input_grad(g, w) if direct else _input_grad(g, w, precision)
    if direct:
        dw = native.conv3d_weight_grad(xp, g, w.shape)
    elif w.shape[3] >= FLAT_WGRAD_MIN_CIN:
        dw = _flat_wgrad(xp, g, w.shape, precision)
    else:                                                        # XLA's backprop-filter conv
        _, filter_vjp = jax.vjp(lambda w: lax.conv_general_dilated(
            xp, w, (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=precision), w)
        (dw,) = filter_vjp(g)
    # check_vma: a replicated w's gradient from per-shard activations is psum'd, as autodiff
    return cotangent_like(dxp, varying(xp)), cotangent_like(dw, varying(w))


_conv.defvjp(_conv_fwd, _conv_bwd)
