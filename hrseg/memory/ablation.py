"""Wang, Oda & Mori's memory ablation (their Table 1) on hrseg's networks.

One row per technique added to ``wang_baseline``: parameters and single-device training-step
bytes, three ways —

* ``estimate``  memory.estimate: parameters, gradients, optimizer state, the activations the
                model code keeps, and the backward pass's working set;
* ``traced``    the same, with the activations replaced by what ``jax.vjp`` actually saves
                (memory.residuals): any backend, nothing compiled;
* ``native``    (``native=shape``) the table's figure (measured, else traced, else estimate)
                at another shape: the largest bucket of a native-size dataset, Wang's
                "256 × 256 × full" (:func:`largest_bucket`; buckets.py pads each case's slices
                to one of a few sizes, so the largest bucket is what a device must hold);
* ``measured``  (``compiled=True``) the compiled step's memory_analysis on this machine's
                backend. On XLA:CPU it differs from the others both ways: its backward pass
                reuses buffers better than the estimate's working set assumes (the fp32 rows
                come out lower), it computes bf16 convolutions in float32, and its heap
                packing leaves gaps (the bf16 row comes out higher).
"""
from __future__ import annotations

import dataclasses

from hrseg.config import ModelConfig
from hrseg.data import buckets, phantom
from hrseg.memory import analytic
from hrseg.memory.compiled import measure, residuals
from hrseg.nn import unet

ABLATION = (  # (row, changes to wang_baseline), as in Wang, Oda & Mori (2020), Table 1
    ("baseline", {}),
    ("+bottleneck", {"block": "bottleneck"}),
    ("+SepConv", {"block": "separable"}),
    ("+CCBlock", {"block": "compact"}),
    ("+InPlaceABN", {"block": "compact", "norm": "inplace_abn"}),
    ("+mixed precision", {"block": "compact", "norm": "inplace_abn", "precision": "bf16"}),
)
KINDS = ("params", "estimate", "traced", "measured", "native")


def largest_bucket(slices, in_plane=(256, 256), levels: int = 4, per_octave: int = 3,
                   ) -> tuple[int, int, int]:
    """The largest padded shape of cases ``in_plane × n`` for ``n`` in ``slices`` on one
    device (buckets.bucket_shape, multiple 2^(levels − 1) per axis)."""
    m = 2 ** (levels - 1)
    return buckets.bucket_shape((*in_plane, max(int(n) for n in slices)), (m, m, m), per_octave)


def phantom_bucket(cases: int = 32, seed: int = 0, in_plane=(256, 256), levels: int = 4,
                   per_octave: int = 3) -> dict:
    """Wang's "256 × 256 × full" for the phantom dataset: its cases' slice counts (80–200,
    phantom.slice_counts) kept, in-plane at 256 × 256 (1.62 mm over the phantom's field of
    view); ``{"slices": (min, max), "buckets": [...], "largest": shape}``."""
    slices = phantom.slice_counts(cases, seed)
    m = 2 ** (levels - 1)
    sizes = sorted({buckets.bucket_size(n, m, per_octave) for n in slices})
    return {"slices": (min(slices), max(slices)), "buckets": sizes,
            "largest": largest_bucket(slices, in_plane, levels, per_octave)}


def _memory(cfg, shape, batch, optimizer, compiled, traced) -> dict:
    est = analytic.estimate(cfg, shape, (1, 1, 1), optimizer=optimizer, batch=batch,
                            backend="none")
    out = {"estimate": est["total"]}
    if traced:
        saved = residuals(cfg, shape, batch=batch)["bytes"]
        out["traced"] = est["total"] - est["activation_bytes"] + saved
    if compiled:
        out["measured"] = measure(cfg, shape, (1, 1, 1), optimizer=optimizer, batch=batch,
                                  backend="none")["total"]
    return out


def ablation(input_shape, batch: int = 1, compiled: bool = False, base: ModelConfig | None = None,
             optimizer: str = "adam", traced: bool = True, native=None) -> list[dict]:
    """One row per technique: parameters and bytes of a single-device training step
    (estimate, traced and — with ``compiled`` — measured), and their fractions of the
    baseline's. ``native``: a second shape (e.g. :func:`largest_bucket`), whose figure of the
    same kind (measured, else traced, else estimate) is the ``native`` column."""
    base = base or unet.preset("wang_baseline")
    rows = []
    for name, changes in ABLATION:
        cfg = dataclasses.replace(base, **changes)
        row = {"row": name, "params": unet.param_count(cfg),
               **_memory(cfg, input_shape, batch, optimizer, compiled, traced)}
        if native is not None:
            at = _memory(cfg, tuple(native), batch, optimizer, compiled, traced)
            row["native"] = at["measured" if compiled else "traced" if traced else "estimate"]
            row["native_shape"] = list(native)
        rows.append(row)
    for row in rows:
        for k in KINDS:
            if k in row:
                row[k + "_fraction"] = round(row[k] / rows[0][k], 3)
    return rows


def format_table(rows: list[dict]) -> str:
    """The ablation rows as a text table (GiB, and % of the baseline)."""
    kinds = [k for k in KINDS[1:] if k in rows[0]]
    label = {"measured": "compiled",
             "native": "×".join(map(str, rows[0].get("native_shape", ())))}
    head = f"{'':18s} {'params':>10s} {'':>5s}" + "".join(f" {label.get(k, k):>10s} {'':>5s}"
                                                         for k in kinds)
    lines = [head]
    for r in rows:
        line = f"{r['row']:18s} {r['params'] / 1e6:9.2f}M {r['params_fraction']:5.0%}"
        for k in kinds:
            line += f" {r[k] / analytic.GiB:7.2f}GiB {r[k + '_fraction']:5.0%}"
        lines.append(line)
    return "\n".join(lines)
