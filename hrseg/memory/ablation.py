"""Wang, Oda & Mori's memory ablation (their Table 1) on hrseg's networks.

One row per technique added to ``wang_baseline``: parameters and single-device training-step
bytes, three ways —

* ``estimate``  memory.estimate: parameters, gradients, optimizer state, the activations the
                model code keeps, and the backward pass's working set;
* ``traced``    the same, with the activations replaced by what ``jax.vjp`` actually saves
                (memory.residuals): any backend, nothing compiled;
* ``measured``  (``compiled=True``) the compiled step's memory_analysis on this machine's
                backend. On XLA:CPU it differs from the others both ways: its backward pass
                reuses buffers better than the estimate's working set assumes (the fp32 rows
                come out lower), it computes bf16 convolutions in float32, and its heap
                packing leaves gaps (the bf16 row comes out higher).
"""
from __future__ import annotations

import dataclasses

from hrseg.config import ModelConfig
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
KINDS = ("params", "estimate", "traced", "measured")


def ablation(input_shape, batch: int = 1, compiled: bool = False, base: ModelConfig | None = None,
             optimizer: str = "adam", traced: bool = True) -> list[dict]:
    """One row per technique: parameters and bytes of a single-device training step
    (estimate, traced and — with ``compiled`` — measured), and their fractions of the
    baseline's."""
    base = base or unet.preset("wang_baseline")
    rows = []
    for name, changes in ABLATION:
        cfg = dataclasses.replace(base, **changes)
        est = analytic.estimate(cfg, input_shape, (1, 1, 1), optimizer=optimizer, batch=batch,
                              backend="none")
        row = {"row": name, "params": unet.param_count(cfg), "estimate": est["total"]}
        if traced:
            saved = residuals(cfg, input_shape, batch=batch)["bytes"]
            row["traced"] = est["total"] - est["activation_bytes"] + saved
        if compiled:
            row["measured"] = measure(cfg, input_shape, (1, 1, 1), optimizer=optimizer,
                                             batch=batch, backend="none")["total"]
        rows.append(row)
    for row in rows:
        for k in KINDS:
            if k in row:
                row[k + "_fraction"] = round(row[k] / rows[0][k], 3)
    return rows


def format_table(rows: list[dict]) -> str:
    """The ablation rows as a text table (GiB, and % of the baseline)."""
    kinds = [k for k in KINDS[1:] if k in rows[0]]
    label = {"measured": "compiled"}
    head = f"{'':18s} {'params':>10s} {'':>5s}" + "".join(f" {label.get(k, k):>10s} {'':>5s}"
                                                         for k in kinds)
    lines = [head]
    for r in rows:
        line = f"{r['row']:18s} {r['params'] / 1e6:9.2f}M {r['params_fraction']:5.0%}"
        for k in kinds:
            line += f" {r[k] / analytic.GiB:7.2f}GiB {r[k + '_fraction']:5.0%}"
        lines.append(line)
    return "\n".join(lines)
