"""``hrseg view``: open a case in napari (the plugin's reader + the synthesis dock widget)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from hrseg.viz.napari._case import case_layers, find_case


def has_display() -> bool:
    """False on Linux without X11/Wayland, where creating the Qt window would abort Python."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or os.environ.get("QT_QPA_PLATFORM"))


# napari's (Z, Y, X) display axes (see _case.to_display), named for the slider labels
AXIS_LABELS = ("z (axial)", "y (coronal)", "x (sagittal)")


def open_case(viewer, path, case=None, data=None) -> list:
    """Add a case's layers (see ``_case``) to ``viewer``; predictions drawn as outlines; the
    view moves to the slice with the most tumour (else liver). Returns the new layers."""
    found = find_case(path, case, data)
    layers = [getattr(viewer, f"add_{kind}")(d, **kw) for d, kw, kind in case_layers(found)]
    for layer in layers:
        if layer.metadata.get("hrseg", {}).get("role") == "prediction":
            layer.contour = 1
            layer.opacity = 1.0
    if viewer.dims.ndim == len(AXIS_LABELS):  # sliders named, not -3 / -2 / -1
        viewer.dims.axis_labels = AXIS_LABELS
    focus_labels(viewer, layers)
    return layers


def focus_labels(viewer, layers) -> None:
    """Set the first (axial) dimension to the slice with the most tumour, else the most liver."""
    for layer in layers:
        if layer.metadata.get("hrseg", {}).get("role") not in ("labels", "prediction"):
            continue
        data = np.asarray(layer.data)
        for value in (2, 1):
            counts = (data == value).sum(axis=(1, 2))
            if counts.max() > 0:
                z = int(np.argmax(counts))
                world = z * layer.scale[0] + layer.translate[0]
                point = list(viewer.dims.point)
                point[0] = world
                viewer.dims.point = point
                return


def view(path, case=None, data=None, screenshot=None, widget: bool = True,
         size: tuple[int, int] = (1100, 800)) -> int:
    """Open napari on a case and block in ``napari.run()``; with ``screenshot`` save the canvas
    as a PNG instead and close (used by tests and to make pictures headlessly under xvfb)."""
    find_case(path, case, data)          # fail fast, before any window appears
    import napari
    viewer = napari.Viewer(title=f"hrseg view {Path(path).name}", show=True)
    try:
        viewer.window.resize(*size)
        open_case(viewer, path, case, data)
        if widget:
            viewer.window.add_plugin_dock_widget("hrseg", "Synthesize tumours")
        if screenshot:
            out = Path(screenshot)
            out.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(out), canvas_only=True)
            print(out)
            return 0
        napari.run()
        return 0
    finally:
        if screenshot:
            viewer.close()
