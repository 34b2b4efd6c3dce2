"""Pictures of CT volumes for notebooks: montages, before/after figures, an ipywidgets slice viewer.

Volumes are ``(X, Y, Z)`` arrays in nibabel's voxel order after ``hrseg.data.dataset`` reoriented them to
canonical RAS+ (x to the patient's Right, y Anterior, z Superior). Slices are shown the way a
radiologist reads them (the DICOM display convention), identically for the three axes:

- axial (``axis=2``): anterior at the top, the patient's right on the image's left
  (looking up from the feet);
- coronal (``axis=1``): superior at the top, the patient's right on the image's left;
- sagittal (``axis=0``): superior at the top, anterior on the image's left.

In array terms a displayed slice is ``np.take(volume, index, axis).T[::-1, ::-1]``
(:func:`display_slice`). Colours: liver green, tumour red (translucent fill or outline),
predicted liver outlined yellow, predicted tumour magenta. All drawing goes through the pure :func:`render_slice`, which returns an
``(H, W, 3)`` uint8 image, so widgets and figures can be tested without a browser or a display.

Figures are built with ``matplotlib.figure.Figure`` (not pyplot): nothing global is left open,
and a notebook cell that returns one shows it once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hrseg import atomic

LIVER_RGB = (0, 255, 0)
TUMOUR_RGB = (255, 0, 0)
LABEL_RGB = {1: LIVER_RGB, 2: TUMOUR_RGB}
PREDICTION_RGB = (255, 255, 0)          # predicted liver: yellow outline
PREDICTION_TUMOUR_RGB = (255, 0, 255)   # predicted tumour: magenta outline
PREDICTION_CLASS_RGB = {1: PREDICTION_RGB, 2: PREDICTION_TUMOUR_RGB}
CLASS_NAMES = {1: "liver", 2: "tumour"}
AXIS_NAMES = ("sagittal", "coronal", "axial")
AXIS_LETTERS = ("x", "y", "z")
HU_WINDOW = (-200.0, 300.0)  # abdominal soft-tissue window: liver and tumours stand out


# --- pure rendering ---------------------------------------------------------------------------

def display_slice(volume, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` of an RAS+ ``(X, Y, Z)`` array along ``axis``, in radiological display
    orientation (rows top to bottom, columns left to right)."""
    return np.take(np.asarray(volume), int(index), axis=int(axis)).T[::-1, ::-1]


def display_spacing(spacing, axis: int) -> tuple[float, float]:
    """(row, column) pixel size in mm of a displayed slice, from the volume's (sx, sy, sz)."""
    rest = [float(s) for i, s in enumerate(spacing) if i != axis]
    return rest[1], rest[0]   # rows run along the later voxel axis (after the transpose)


def default_window(volume) -> tuple[float, float]:
    """Display window (lo, hi): the abdominal HU window, or its image under the default hrseg
    windowing ``clip(HU / 1024 + 0.5, 0, 1)`` when the volume is already in [0, 1]."""
    v = np.asarray(volume)
    if v.size and float(np.nanmax(v)) <= 1.5 and float(np.nanmin(v)) >= -0.5:
        return tuple(float(h / 1024.0 + 0.5) for h in HU_WINDOW)
    return HU_WINDOW


def window_to_level(window) -> tuple[float, float]:
    """(lo, hi) -> (width, centre)."""
    lo, hi = (float(w) for w in window)
    return hi - lo, (lo + hi) / 2.0


def grey(values, window: float, level: float) -> np.ndarray:
    """Window/level to uint8: ``lo = level - window/2`` maps to 0, ``lo + window`` to 255."""
    window = max(float(window), 1e-12)
    lo = float(level) - window / 2.0
    g = np.clip((np.asarray(values, np.float64) - lo) / window, 0.0, 1.0)
    return np.round(g * 255.0).astype(np.uint8)


def outline(mask) -> np.ndarray:
    """Pixels of ``mask`` with at least one 4-neighbour outside it (the image edge counts as
    outside)."""
    m = np.asarray(mask, bool)
    p = np.pad(m, 1, constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def render_slice(volume, labels=None, prediction=None, axis: int = 2, index: int | None = None,
                 window: float | None = None, level: float | None = None,
                 show_labels: bool = True, show_prediction: bool = True, *,
                 style: str = "fill", alpha: float = 0.4) -> np.ndarray:
    """One slice as an ``(H, W, 3)`` uint8 RGB image.

    ``window``/``level`` are the width and centre of the grey window (None: :func:`default_window`).
    Labels (1 liver, 2 tumour) are blended with ``alpha`` over the grey image (``style="fill"``) or
    drawn as 1-pixel outlines (``style="contour"``); predicted classes are outlined on top, one
    colour per class (:data:`PREDICTION_CLASS_RGB`: liver yellow, tumour magenta). Pixels with no label and no prediction outline stay grey (R == G == B).
    """
    if style not in ("fill", "contour"):
        raise ValueError(f"style must be 'fill' or 'contour', got {style!r}")
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D (X, Y, Z) volume, got shape {volume.shape}")
    for name, arr in (("labels", labels), ("prediction", prediction)):
        if arr is not None and np.shape(arr) != volume.shape:
            raise ValueError(f"{name} shape {np.shape(arr)} != volume shape {volume.shape}")
    if index is None:
        index = volume.shape[axis] // 2
    if not 0 <= index < volume.shape[axis]:
        raise ValueError(f"slice {index} out of range 0..{volume.shape[axis] - 1} on axis {axis}")
    if window is None or level is None:
        w, l = window_to_level(default_window(volume))
        window = w if window is None else window
        level = l if level is None else level

    g = grey(display_slice(volume, axis, index), window, level)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if labels is not None and show_labels:
        lab = display_slice(labels, axis, index)
        for value, colour in LABEL_RGB.items():
            m = lab == value
            if style == "contour":
                m = outline(m)
                rgb[m] = colour
            elif m.any():
                blend = (1 - alpha) * rgb[m].astype(np.float64) + alpha * np.asarray(colour)
                rgb[m] = np.round(blend).astype(np.uint8)
    if prediction is not None and show_prediction:
        pred = display_slice(prediction, axis, index)
        for value in np.unique(pred):  # liver first, so a tumour's outline stays on top
            if value > 0:
                rgb[outline(pred == value)] = PREDICTION_CLASS_RGB.get(int(value), PREDICTION_RGB)
    return rgb


def interesting_index(labels, axis: int, shape) -> int:
    """The slice to show first: most tumour, else most liver, else the middle."""
    if labels is not None:
        lab = np.asarray(labels)
        other = tuple(i for i in range(3) if i != axis)
        for value in (2, 1):
            counts = (lab == value).sum(axis=other)
            if counts.max() > 0:
                return int(np.argmax(counts))
    return int(shape[axis]) // 2


def montage_indices(shape, labels=None, axis: int = 2, n: int = 6) -> list[int]:
    """``n`` slice indices spread over the labelled extent (the whole volume without labels),
    always including the slice with the most tumour."""
    size = int(shape[axis])
    lo, hi = 0, size - 1
    best = None
    if labels is not None:
        lab = np.asarray(labels)
        other = tuple(i for i in range(3) if i != axis)
        present = np.flatnonzero((lab > 0).any(axis=other))
        if present.size:
            lo, hi = int(present[0]), int(present[-1])
            tumour = (lab == 2).sum(axis=other)
            best = int(np.argmax(tumour)) if tumour.max() > 0 else None
    if labels is None or lo == 0 and hi == size - 1:
        idx = np.linspace(0, size - 1, n + 2)[1:-1]   # interior slices, skip the edges
    else:
        idx = np.linspace(lo, hi, n)
    out = sorted({round(float(i)) for i in idx})
    if best is not None and best not in out:
        out[int(np.argmin([abs(i - best) for i in out]))] = best
        out = sorted(set(out))
    return out


def _finish(fig, handles, title):
    """The legend under the panels (when there is one) and the title."""
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9,
                   frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def _legend_handles(labels, prediction, style):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = []
    if labels is not None:
        present = set(np.unique(np.asarray(labels)).tolist())
        for value, name in ((1, "liver"), (2, "tumour")):
            if value in present:
                c = np.asarray(LABEL_RGB[value]) / 255
                handles.append(Line2D([], [], color=c, label=name) if style == "contour"
                               else Patch(facecolor=c, alpha=0.6, label=name))
    if prediction is not None:
        present = set(np.unique(np.asarray(prediction)).tolist())
        for value, name in CLASS_NAMES.items():
            if value in present:
                handles.append(Line2D([], [], color=np.asarray(PREDICTION_CLASS_RGB[value]) / 255,
                                      label=f"predicted {name} (outline)"))
    return handles


def montage(volume, labels=None, prediction=None, axis: int = 2, n: int = 6, window=None, *,
            spacing=None, indices=None, style: str = "fill", cols: int | None = None,
            title: str | None = None, panel_size: float = 2.6):
    """A grid of ``n`` slices (see :func:`montage_indices`) with labels and prediction overlaid.

    ``window`` is the grey window ``(lo, hi)`` (None: :func:`default_window`); ``spacing``
    ``(sx, sy, sz)`` in mm gives pixels their true aspect ratio. Returns a matplotlib Figure.
    """
    from matplotlib.figure import Figure
    volume = np.asarray(volume)
    window = default_window(volume) if window is None else window
    width, level = window_to_level(window)
    if indices is None:
        indices = montage_indices(volume.shape, labels, axis, n)
    cols = cols or (len(indices) if len(indices) <= 4 else 3 if len(indices) <= 6 else 4)
    rows = -(-len(indices) // cols)
    aspect = 1.0
    if spacing is not None:
        r, c = display_spacing(spacing, axis)
        aspect = r / c
    h, w = display_slice(volume, axis, 0).shape
    ratio = float(np.clip(h * aspect / w, 0.25, 4.0))     # panel height / width
    fig = Figure(figsize=(panel_size * cols, panel_size * ratio * rows + 0.8),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, i in zip(axes.ravel(), indices):
        ax.imshow(render_slice(volume, labels, prediction, axis, i, width, level, style=style),
                  aspect=aspect, interpolation="nearest")
        ax.set_title(f"{AXIS_NAMES[axis]} {AXIS_LETTERS[axis]}={i}", fontsize=9)
    return _finish(fig, _legend_handles(labels, prediction, style), title)


def difference_figure(before, after, labels_before=None, labels_after=None, axis: int = 2,
                      index: int | None = None, window=None, *, spacing=None,
                      title: str | None = None, unit: str | None = None, hu_window=None):
    """Before / after / (after - before) on one slice, e.g. for tumour synthesis.

    ``hu_window=(lo, hi)``: the volumes were scaled to [0, 1] from these HU (data.hu_window);
    they are shown, and their difference measured, in HU again.

    Labels are drawn as outlines so the intensity change stays visible. ``index`` None picks the
    slice with the largest total absolute change (else the most tumour, else the middle). The
    difference uses a symmetric blue-red map in the volume's units with a colour bar labelled
    ``unit`` (None: "HU" for CT values, else "window units" for volumes scaled to [0, 1]).
    """
    from matplotlib.figure import Figure
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} differ in shape")
    if hu_window is not None:
        lo, hi = (float(v) for v in hu_window)
        before, after = (lo + v.astype(np.float64) * (hi - lo) for v in (before, after))
        unit = unit or "HU"
    diff = after.astype(np.float64) - before.astype(np.float64)
    if index is None:
        other = tuple(i for i in range(3) if i != axis)
        change = np.abs(diff).sum(axis=other)
        index = (int(np.argmax(change)) if change.max() > 0
                 else interesting_index(labels_after, axis, before.shape))
    window = default_window(before) if window is None else window
    width, level = window_to_level(window)
    aspect = 1.0
    if spacing is not None:
        r, c = display_spacing(spacing, axis)
        aspect = r / c
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, vol, lab, name in ((axes[0], before, labels_before, "before"),
                               (axes[1], after, labels_after, "after")):
        ax.imshow(render_slice(vol, lab, None, axis, index, width, level, style="contour"),
                  aspect=aspect, interpolation="nearest")
        ax.set_title(f"{name} ({AXIS_NAMES[axis]} {AXIS_LETTERS[axis]}={index})", fontsize=9)
    d = display_slice(diff, axis, index)
    vmax = float(np.abs(d).max()) or 1.0
    im = axes[2].imshow(d, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect=aspect,
                        interpolation="nearest")
    axes[2].set_title("after − before", fontsize=9)
    if unit is None:
        unit = "HU" if max(np.abs(before).max(), np.abs(after).max()) > 2 else "window units"
    fig.colorbar(im, ax=axes[2], shrink=0.8, label=f"after − before ({unit})")
    for ax in axes:
        ax.set_axis_off()
    shown = labels_after if labels_after is not None else labels_before
    return _finish(fig, _legend_handles(shown, None, "contour"), title)


def save(fig, path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file in the same folder, then rename), so a
    reader never sees half a picture; the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic.temp_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return path

