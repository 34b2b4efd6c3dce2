"""The backward pass's peak, as a compiler reaches it: what is still kept, what XLA recomputes
instead of keeping, and each unit's working set — and how that depends on whose compiler
(``platform``): XLA:CPU widens 16-bit convs to float32, a GPU's or TPU's does not.
analytic.py lists the tensors and the units' steps; this walks them.
"""
from __future__ import annotations

import math

import jax

GRAD_BYTES = 4  # the backward's working gradients: XLA:CPU computes 16-bit convs in float32
PLATFORMS = ("cpu", "gpu", "tpu")   # whose compiler the estimate counts for (``platform=``)


def platform_of(name: str | None = None) -> str:
    """``name`` checked (one of PLATFORMS; ``cuda``/``rocm`` are ``gpu``), or this process's
    JAX backend when None."""
    name = (name or jax.default_backend()).lower()
    name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    if name not in PLATFORMS:
        raise ValueError(f"platform {name!r}: expected one of {', '.join(PLATFORMS)}")
    return name


def grad_bytes(platform: str, compute_bytes: int) -> int:
    """Bytes per element of the backward's working gradients: XLA:CPU widens a 16-bit conv to
    float32 (its gradients, its padded input, its kernel); a GPU's or TPU's compiler runs it in
    the compute dtype (accumulating in float32 inside the kernel, not in memory)."""
    return GRAD_BYTES if platform == "cpu" else compute_bytes


def recomputed(acts) -> list:
    """What autodiff saves and the compiled step does not keep: the activation's mask where the
    normalization keeps its input (the backward's fused elementwise ops recompute it: one
    compare), and a nearest up-sampling's repeated tensor (a broadcast of the coarser tensor,
    which XLA fuses into the copy the weight gradient's conv reads)."""
    kept = {t.name for t in acts}
    return [t for t in acts if t.name.endswith(".repeated") or (
        t.name.endswith(".mask") and t.name[:-5] + ".input" in kept)]


def backward_peak(acts, steps, grad_bytes: int = 4, grad_copies: int = 1) -> dict:
    """The backward pass's peak: at the backward of each unit (last first), what is still kept —
    every tensor saved before the unit's output, its normalization input, and with a 16-bit
    compute dtype the kernels of the units up to it (XLA:CPU widens each to ``grad_bytes``
    once, for the forward conv and the backward's input gradient) — plus the unit's working
    set: the gradients of the conv's output and input, each also in the transposed layout the
    weight gradient's conv reads (``2 × (in + out)`` elements of ``grad_bytes``; 16-bit: also
    the conv's input widened, padded by the 3³ kernel's margins where its level exchanges
    halos: ``steps``' last field) — plus the parameter
    gradients already made (the units after it; ``grad_copies`` = 2 on a mesh, where each is
    all-reduced as it is made: its input and output). The largest over the units."""
    drop = {id(t) for t in recomputed(acts)}
    pos = {id(t): i for i, t in enumerate(acts)}
    prefix = [0]
    for t in acts:
        prefix.append(prefix[-1] + (0 if id(t) in drop or t.name == "kernels.cast"
                                    else t.bytes))
    best = {"bytes": 0, "workspace": 0, "kept": 0, "unit": None}
    total = sum(s[3] for s in steps)   # parameters
    done = 0
    for y, x, n_out, params, halo in reversed(steps):
        widened = y.itemsize < grad_bytes
        if id(y) in pos:   # (not: an output the next layer does not keep, a resize conv's)
            kept = prefix[pos[id(y)]] + (total - done) * grad_bytes * widened
            work = 2 * (math.prod(x) + n_out) * grad_bytes
            if widened:   # the halo-exchanged input is padded; XLA's own conv pads inside
                work += math.prod((s + 2 if halo else s) for s in x[1:-1]) * x[0] * x[-1] \
                    * grad_bytes
            grads = 4 * done * grad_copies
            if kept + work + grads > best["bytes"]:
                best = {"bytes": kept + work + grads, "workspace": work, "kept": kept,
                        "unit": y.name}
        done += params
    return best
