"""The ipywidgets slice viewer: axis, slice, overlay toggles and window/level around
:func:`hrseg.viz.figures.render_slice`, with a static PNG for executed notebooks.

The slice is drawn with the voxels' true aspect (``spacing``) inside a bounded box
(:data:`DISPLAY_BOX`, 560 × 400 px: on a 1366 × 768 screen JupyterLab shows the whole slice and
its controls together), and window/level read in HU when the volume is in HU or ``hu_window``
says how it was scaled to [0, 1].
"""
from __future__ import annotations

import io

import numpy as np

from hrseg.viz.figures import (
    AXIS_LETTERS,
    AXIS_NAMES,
    default_window,
    display_spacing,
    interesting_index,
    render_slice,
    window_to_level,
)

DISPLAY_BOX = (560, 400)     # (width, height) px the slice is shown within


def fit(shape, box=DISPLAY_BOX) -> tuple[int, int]:
    """(width, height) px of an image of ``shape`` (H, W, …) scaled to fit ``box`` (W, H)."""
    h, w = shape[:2]
    k = min(box[0] / w, box[1] / h)
    return max(1, round(w * k)), max(1, round(h * k))


def upsample(rgb: np.ndarray, pixel_mm=(1.0, 1.0), min_size: int = 384) -> np.ndarray:
    """Nearest-neighbour resize of a rendered slice: true aspect ratio from the (row, column)
    pixel size, the longer side at least ``min_size`` so small volumes stay readable."""
    h, w = rgb.shape[:2]
    r, c = (float(p) for p in pixel_mm)
    ph, pw = h * r / min(r, c), w * c / min(r, c)
    k = max(1.0, min_size / max(ph, pw))
    out_h, out_w = max(1, round(ph * k)), max(1, round(pw * k))
    rows = np.minimum((np.arange(out_h) * h) // out_h, h - 1)
    cols = np.minimum((np.arange(out_w) * w) // out_w, w - 1)
    return rgb[rows][:, cols]


def to_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) uint8 image."""
    from matplotlib.image import imsave
    buf = io.BytesIO()
    imsave(buf, np.ascontiguousarray(rgb), format="png")
    return buf.getvalue()


class SliceViewer:
    """Axis choice, slice slider, label/prediction toggles and window/level sliders around
    :func:`render_slice`; the picture is a PNG in an ``ipywidgets.Image``.

    Display it as the last expression of a cell. Its display bundle carries the live widget and
    a PNG of the current slice, so an executed notebook (papermill, nbconvert) keeps a picture
    where no widget can run. ``rgb`` is the slice currently shown, at voxel resolution.
    """

    def __init__(self, volume, labels=None, prediction=None, axis: int = 2, window=None,
                 spacing=None, min_size: int = 384, hu_window=None, box=DISPLAY_BOX):
        import ipywidgets as W
        self.volume = np.asarray(volume)
        self.unit = ""
        if hu_window is not None:  # a volume scaled to [0, 1] from these HU: show HU again
            lo, hi = (float(v) for v in hu_window)
            self.volume = lo + self.volume.astype(np.float32) * (hi - lo)
            self.unit = " HU"
        elif self.volume.size and float(np.nanmax(np.abs(self.volume))) > 2:
            self.unit = " HU"
        if self.volume.ndim != 3:
            raise ValueError(f"expected a 3D (X, Y, Z) volume, got shape {self.volume.shape}")
        self.labels = None if labels is None else np.asarray(labels)
        self.prediction = None if prediction is None else np.asarray(prediction)
        self.spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
        self.min_size, self.box = min_size, tuple(box)
        width, level = window_to_level(default_window(self.volume) if window is None else window)
        vmin, vmax = float(np.nanmin(self.volume)), float(np.nanmax(self.volume))
        span = max(vmax - vmin, width, 1e-6)
        step = float(10.0 ** np.floor(np.log10(span / 1000)))   # 1 HU for CT, 0.001 for [0, 1]

        self.axis = W.ToggleButtons(
            options=[(f"{AXIS_NAMES[a]} ({AXIS_LETTERS[a]})", a) for a in range(3)],
            value=int(axis), description="axis")
        self.index = W.IntSlider(min=0, max=self.volume.shape[axis] - 1,
                                 value=interesting_index(self.labels, axis, self.volume.shape),
                                 description="slice", continuous_update=True)
        self.show_labels = W.Checkbox(value=self.labels is not None, description="labels",
                                      disabled=self.labels is None, indent=False)
        self.show_prediction = W.Checkbox(value=self.prediction is not None,
                                          description="prediction (outline)",
                                          disabled=self.prediction is None, indent=False)
        unit = f" ({self.unit.strip()})" if self.unit else ""
        self.window = W.FloatSlider(min=step, max=span, step=step, value=width,
                                    description=f"window{unit}", readout_format=".4g",
                                    style={"description_width": "initial"})
        self.level = W.FloatSlider(min=min(vmin, level), max=max(vmax, level), step=step,
                                   value=level, description=f"level{unit}", readout_format=".4g",
                                   style={"description_width": "initial"})
        # shown at fit(box) px (render sets width/height), never wider than the cell, aspect
        # kept (object-fit), not stretched to the cell's width by the VBox
        self.image = W.Image(format="png", layout=W.Layout(max_width="100%", object_fit="contain",
                                                           align_self="flex-start"))
        self.caption = W.HTML()
        wrap = W.Layout(flex_flow="row wrap", max_width="100%")
        self.widget = W.VBox([
            self.axis,
            W.HBox([self.index, self.show_labels, self.show_prediction], layout=wrap),
            W.HBox([self.window, self.level], layout=wrap),
            self.image, self.caption], layout=W.Layout(max_width="100%"))
        self.rgb = None
        self.axis.observe(self._on_axis, names="value")
        for w in (self.index, self.show_labels, self.show_prediction, self.window, self.level):
            w.observe(lambda _change: self.render(), names="value")
        self.render()

    def _on_axis(self, change):
        a = change["new"]
        index = interesting_index(self.labels, a, self.volume.shape)
        with self.index.hold_trait_notifications():
            # Lower the value before the max so the slider never clamps to a stale range.
            self.index.value = min(self.index.value, self.volume.shape[a] - 1)
            self.index.max = self.volume.shape[a] - 1
            self.index.value = index
        self.render()

    def render(self) -> np.ndarray:
        """Redraw from the current control values; returns the voxel-resolution RGB slice."""
        a = self.axis.value
        self.rgb = render_slice(self.volume, self.labels, self.prediction, a, self.index.value,
                                self.window.value, self.level.value, self.show_labels.value,
                                self.show_prediction.value)
        shown = upsample(self.rgb, display_spacing(self.spacing, a), self.min_size)
        self.png = to_png(shown)
        self.image.value = self.png
        self.size = fit(shown.shape, self.box)             # (width, height) px on the page
        self.image.layout.width, self.image.layout.height = (f"{n}px" for n in self.size)
        scale = "" if self.unit else " (0–1 scale; pass hu_window for HU)"
        self.caption.value = (f"{AXIS_NAMES[a]} {AXIS_LETTERS[a]}={self.index.value}"
                              f"/{self.volume.shape[a] - 1} · window {self.window.value:.4g}"
                              f"{self.unit} · level {self.level.value:.4g}{self.unit}{scale}")
        return self.rgb

    def _repr_mimebundle_(self, **kwargs):
        """(data, metadata): the widget, and the PNG shown at the same bounded size."""
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        bundle["image/png"] = self.png
        bundle["text/plain"] = f"<SliceViewer {self.caption.value}>"
        width, height = self.size
        return bundle, {"image/png": {"width": width, "height": height}}


def slice_viewer(volume, labels=None, prediction=None, axis: int = 2, window=None, *,
                 spacing=None, hu_window=None, box=DISPLAY_BOX):
    """An ipywidgets slice viewer for JupyterLab (static PNG fallback in executed notebooks);
    see :class:`SliceViewer`. ``spacing``: mm per voxel (x, y, z), drawn to scale (a loaded
    case: ``volume.spacing``). ``hu_window=(lo, hi)``: the volume was scaled to [0, 1] from
    these HU (``volume.hu_window``); window and level are then shown in HU. ``box``: the
    (width, height) px the slice fits in. Needs ``ipywidgets``."""
    return SliceViewer(volume, labels, prediction, axis=axis, window=window, spacing=spacing,
                       hu_window=hu_window, box=box)
