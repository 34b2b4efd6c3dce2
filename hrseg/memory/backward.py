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


def _kept(t, dropped: bool, widened: bool, dt: int) -> int:
    """Bytes a saved tensor holds in the compiled step (``dropped``: in :func:`recomputed`).
    Where XLA:CPU widens the 16-bit convs, a recomputed mask is read from the pre-activation,
    which stays kept in the compute dtype (``dt`` bytes). The kernels' 16-bit casts are
    counted per unit by :func:`backward_peak`."""
    if t.name == "kernels.cast":
        return 0
    if dropped:
        return math.prod(t.shape) * dt if widened and t.name.endswith(".mask") else 0
    return t.bytes


def backward_peak(acts, steps, grad_bytes: int = 4, grad_copies: int = 1) -> dict:
    """The backward pass's peak: at the backward of each unit (last first), what is still kept —
    every tensor saved before the unit's output, and with a 16-bit compute dtype the 16-bit
    casts of the kernels of the units up to it — plus the unit's working set: the gradients of
    the conv's output and input, each also in the transposed layout the weight gradient's conv
    reads (``2 × (in + out)`` elements of ``grad_bytes``) — plus the parameter gradients
    already made (the units after it; ``grad_copies`` = 2 on a mesh, where each is all-reduced
    as it is made: its input and output). The largest over the units.

    Where XLA:CPU widens 16-bit convs to float32 (``grad_bytes`` above the compute dtype's),
    read from its buffer assignment at the peak (docs/design/memory-estimation.md): the
    unit's normalization runs its backward before the conv's, so the unit's own normalization
    input and pre-activation are gone when the conv's working set is allocated; each saved
    mask is the pre-activation in the compute dtype; the widened conv input is the transposed
    copy the working set already counts."""
    drop = {id(t) for t in recomputed(acts)}
    pos = {id(t): i for i, t in enumerate(acts)}
    best = {"bytes": 0, "workspace": 0, "kept": 0, "unit": None}
    if not steps:
        return best
    dt = steps[0][0].itemsize                      # the compute dtype: every unit's output
    widened = dt < grad_bytes
    prefix = [0]
    for t in acts:
        prefix.append(prefix[-1] + _kept(t, id(t) in drop, widened, dt))
    total = sum(s[3] for s in steps)   # parameters
    done = 0
    for y, x, n_out, params in reversed(steps):
        if id(y) in pos:   # (not: an output the next layer does not keep, a resize conv's)
            at = pos[id(y)]
            while widened and at and acts[at - 1].name in (f"{y.name}.mask", f"{y.name}.input"):
                at -= 1    # the unit's own normalization tensors: consumed before its conv's
            kept = prefix[at] + (total - done) * dt * (dt < 4)   # kernels still to use, cast
            work = 2 * (math.prod(x) + n_out) * grad_bytes
            grads = 4 * done * grad_copies
            if kept + work + grads > best["bytes"]:
                best = {"bytes": kept + work + grads, "workspace": work, "kept": kept,
                        "unit": y.name}
        done += params
    return best
