"""Tumour synthesis on napari layer data (no Qt here; the dock widget is ``_widget``).

The synthesis works on the windowed [0, 1] image the network sees (``hrseg.data.dataset.window`` with
the default ``data.hu_window``, HU [-512, 512] -> [0, 1]); the change it makes is mapped back
to HU and added to the CT, so every voxel it does not touch keeps its exact HU value and the
result shows with the same contrast as the original. Layers are converted back to canonical
RAS+ order before the call and the seed's key is used through ``hrseg.data.augment.split_key``,
as the training augmentation uses it, so a seed draws the same tumours here as training would
on the same volume and grid.
"""
from __future__ import annotations

import numpy as np

from hrseg.viz.napari._case import from_display, to_display

SYNTH_CT = "synthetic CT"
SYNTH_LABELS = "synthetic labels"


def _is_unit(volume) -> bool:
    return float(np.nanmin(volume)) >= -0.01 and float(np.nanmax(volume)) <= 1.01


def synthesize(ct, labels, seed: int, probability: float = 1.0,
               fraction: tuple[float, float] = (0.05, 0.25)):
    """Tumour synthesis on napari layer data (display order, see ``_case.to_display``).

    ``ct`` in HU (or already in [0, 1]); ``labels`` 0/1/2. With probability ``probability``
    (drawn from ``seed``) returns ``(new_ct, new_labels, True)``, else the inputs and False.
    """
    import jax
    import jax.numpy as jnp

    from hrseg.data.augment import split_key, synthesize_tumours

    lo, hi = (float(f) for f in fraction)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"fraction must satisfy 0 <= min <= max <= 1, got ({lo}, {hi})")
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    ct = np.asarray(ct)
    labels = np.asarray(labels)
    if ct.shape != labels.shape:
        raise ValueError(f"CT {ct.shape} and labels {labels.shape} differ in shape")
    if not (labels == 1).any() and not (labels == 2).any():
        raise ValueError("the labels have no liver (1): nowhere to put tumours")
    synthesise, k_synth, _ = split_key(jax.random.PRNGKey(int(seed)), probability)
    if not bool(synthesise):
        return ct, labels, False

    from hrseg.config import DataConfig
    from hrseg.data.dataset import window
    hu = from_display(ct).astype(np.float32)
    lab = from_display(labels).astype(np.int32)
    if _is_unit(hu):
        scale, unit = 1.0, hu
    else:
        w_lo, w_hi = DataConfig().hu_window
        scale, unit = w_hi - w_lo, window(hu, (w_lo, w_hi))
    new_unit, new_lab = synthesize_tumours(k_synth, jnp.asarray(unit), jnp.asarray(lab),
                                           fraction=(lo, hi))
    delta = (np.asarray(new_unit, np.float32) - unit) * np.float32(scale)
    new_hu = np.where(delta != 0, hu + delta, hu)
    if np.issubdtype(ct.dtype, np.integer):      # int16 HU from the file: stay whole HU
        new_hu = np.rint(new_hu)
    new_hu = new_hu.astype(ct.dtype, copy=False)
    return (np.ascontiguousarray(to_display(new_hu)),
            np.ascontiguousarray(to_display(np.asarray(new_lab).astype(labels.dtype))), True)
