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
                come out lower), it computes 16-bit convolutions in float32, and its heap
                packing leaves gaps (the fp16 row comes out higher).

The mixed-precision row is fp16 with dynamic loss scaling and float32 master weights (Wang's
NVIDIA AMP). :func:`paper_comparison` sets Wang's Table 1 (parameters; GB at 96³,
256 × 256 × 152 and 256 × 256 × full) beside ours, row by row (``hrseg memory --wang``); the
network's fit to their parameter counts is in docs/papers-wang.md.
"""
from __future__ import annotations

import dataclasses

from hrseg.config import ModelConfig
from hrseg.data import buckets
from hrseg.memory import analytic
from hrseg.memory.compiled import measure, residuals
from hrseg.nn import unet

ABLATION = (  # (row, changes to wang_baseline), as in Wang, Oda & Mori (2020), Table 1
    ("baseline", {}),
    ("+bottleneck", {"block": "bottleneck"}),
    ("+SepConv", {"block": "separable"}),
    ("+CCBlock", {"block": "compact"}),
    ("+InPlaceABN", {"block": "compact", "norm": "inplace_abn"}),
    ("+mixed precision", {"block": "compact", "norm": "inplace_abn", "precision": "fp16"}),
)

# Wang, Oda & Mori (2020), Table 1, row by row (same order as ABLATION): parameters (millions)
# and GPU memory (GB, nvidia-smi on a 32 GB V100, batch 1) at 96³, 256×256×152 and
# 256×256×full (45–234 slices); None: "> 32 GB", it did not fit.
WANG_TABLE1 = (
    (9.5, 3.7, 28.4, None),
    (3.2, 3.1, 28.3, None),
    (2.7, 3.2, 30.1, None),
    (2.6, 3.0, 27.2, None),
    (2.6, 2.3, 20.0, 30.2),
    (2.6, 1.6, 11.7, 17.6),
)
WANG_SLICES = (45, 234)   # KiTS19 at 3.22 mm: slices per case (Wang et al., Sec. 3)
# Table 1's three inputs: (label, shape); "full" is the largest bucket of 45–234 slices.
WANG_SIZES = (("96×96×96", (96, 96, 96)), ("256×256×152", (256, 256, 152)),
              ("256×256×full", None))
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
    # imported here: its imports take seconds, and `hrseg memory` needs none of them
    from hrseg.data import phantom
    slices = phantom.slice_counts(cases, seed)
    m = 2 ** (levels - 1)
    sizes = sorted({buckets.bucket_size(n, m, per_octave) for n in slices})
    return {"slices": (min(slices), max(slices)), "buckets": sizes,
            "largest": largest_bucket(slices, in_plane, levels, per_octave)}


def _memory(cfg, shape, batch, optimizer, compiled, traced, platform=None) -> dict:
    est = analytic.estimate(cfg, shape, (1, 1, 1), optimizer=optimizer, batch=batch,
                            backend="none", platform=platform)
    out = {"estimate": est["total"]}
    if traced:
        saved = residuals(cfg, shape, batch=batch)["bytes"]
        out["traced"] = est["total"] - est["activation_bytes"] + saved
    if compiled:
        out["measured"] = measure(cfg, shape, (1, 1, 1), optimizer=optimizer, batch=batch,
                                  backend="none")["total"]
    return out


def ablation(input_shape, batch: int = 1, compiled: bool = False, base: ModelConfig | None = None,
             optimizer: str = "adam", traced: bool = True, native=None,
             platform: str | None = None) -> list[dict]:
    """One row per technique: parameters and bytes of a single-device training step
    (estimate, traced and — with ``compiled`` — measured), and their fractions of the
    baseline's. ``native``: a second shape (e.g. :func:`largest_bucket`), whose figure of the
    same kind (measured, else traced, else estimate) is the ``native`` column. ``platform``:
    whose compiler the estimate counts for (analytic.estimate; "measured" is this machine's)."""
    base = base or unet.preset("wang_baseline")
    rows = []
    for name, changes in ABLATION:
        cfg = dataclasses.replace(base, **changes)
        row = {"row": name, "params": unet.param_count(cfg),
               **_memory(cfg, input_shape, batch, optimizer, compiled, traced, platform)}
        if native is not None:
            at = _memory(cfg, tuple(native), batch, optimizer, compiled, traced, platform)
            row["native"] = at["measured" if compiled else "traced" if traced else "estimate"]
            row["native_shape"] = list(native)
        rows.append(row)
    for row in rows:
        for k in KINDS:
            if k in row:
                row[k + "_fraction"] = round(row[k] / rows[0][k], 3)
    return rows


def paper_comparison(sizes=WANG_SIZES, kind: str = "estimate",
                     base: ModelConfig | None = None, platform: str = "gpu") -> list[dict]:
    """Wang et al.'s Table 1 beside ours, row by row: parameters and single-device training-step
    memory (batch 1, Adam) at each of ``sizes`` — ``(label, shape)``, labels from
    :data:`WANG_SIZES` (the shape may differ: smaller for a test); a None shape is
    "256 × 256 × full", the largest bucket of KiTS's 45–234 slices (:func:`largest_bucket`).
    ``kind``: "estimate" (analytic, cheap at any size), "traced" or "measured" (compiles).
    ``platform``: whose compiler the estimate counts for — Wang et al.'s, a GPU's, by default.

    Each row: ``row``, ``params``, ``wang_params`` (the paper's, in units), their fractions of
    the baseline, and per size ``label``: ``{"shape", "ours", "ours_fraction", "wang",
    "wang_fraction"}`` (bytes; Wang's GB as 1e9 bytes, None where it did not fit in 32 GB).
    """
    if kind not in ("estimate", "traced", "measured"):
        raise ValueError(f"kind '{kind}' is not estimate, traced or measured")
    columns = [label for label, _ in WANG_SIZES]
    unknown = [label for label, _ in sizes if label not in columns]
    if unknown:
        raise ValueError(f"sizes {unknown}: Table 1's columns are {', '.join(columns)}")
    base = base or unet.preset("wang_baseline")
    levels = base.levels
    shapes = [(label, tuple(shape) if shape is not None else
               largest_bucket(WANG_SLICES, levels=levels)) for label, shape in sizes]
    rows = []
    for (name, changes), (w_params, *w_gb) in zip(ABLATION, WANG_TABLE1):
        cfg = dataclasses.replace(base, **changes)
        row = {"row": name, "params": unet.param_count(cfg), "wang_params": w_params * 1e6}
        for label, shape in shapes:
            ours = _memory(cfg, shape, 1, "adam", kind == "measured", kind == "traced",
                           platform)[kind]
            wang = w_gb[columns.index(label)]
            row[label] = {"shape": list(shape), "ours": ours,
                          "wang": None if wang is None else wang * 1e9}
        rows.append(row)
    first = rows[0]
    for row in rows:
        row["params_fraction"] = round(row["params"] / first["params"], 3)
        row["wang_params_fraction"] = round(row["wang_params"] / first["wang_params"], 3)
        for label, _ in shapes:
            cell, ref = row[label], first[label]
            cell["ours_fraction"] = round(cell["ours"] / ref["ours"], 3)
            cell["wang_fraction"] = (None if cell["wang"] is None or ref["wang"] is None
                                     else round(cell["wang"] / ref["wang"], 3))
    return rows


def format_comparison(rows: list[dict]) -> str:
    """:func:`paper_comparison` as text: one line per row, ours beside Wang's (GiB for ours,
    Wang's GB as printed; fractions of each one's baseline). Wang's figures are nvidia-smi's
    (CUDA context and PyTorch's cached blocks included), ours a step's bytes: compare the
    fractions, not the absolute figures."""
    labels = [k for k, v in rows[0].items() if isinstance(v, dict)]
    head = f"{'':18s} {'params: ours':>14s} {'Wang':>12s}"
    sub = f"{'':18s} {'':>14s} {'':>12s}"
    for label in labels:
        shape = "×".join(map(str, rows[0][label]["shape"]))
        head += f" | {label + ' (' + shape + ')' if 'full' in label else label:^28s}"
        sub += f" | {'ours GiB':>13s} {'Wang GB':>14s}"
    lines = [head, sub]
    for r in rows:
        line = (f"{r['row']:18s} {r['params'] / 1e6:6.2f}M ({r['params_fraction']:4.0%})"
                f" {r['wang_params'] / 1e6:4.1f}M ({r['wang_params_fraction']:4.0%})")
        for label in labels:
            c = r[label]
            wang = ("> 32 (  — )" if c["wang"] is None else
                    f"{c['wang'] / 1e9:6.1f} ({c['wang_fraction']:4.0%})" if c["wang_fraction"]
                    is not None else f"{c['wang'] / 1e9:6.1f} (  — )")
            line += f" | {c['ours'] / analytic.GiB:6.2f} ({c['ours_fraction']:4.0%}) {wang:>14s}"
        lines.append(line)
    return "\n".join(lines)


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

