"""Pictures: matplotlib figures, the ipywidgets slice viewer, the napari plugin.

    figures     slice rendering (radiological convention), montages, difference figures
    viewer      the ipywidgets slice viewer with a static PNG fallback
    napari/     npe2 plugin: NIfTI reader, label layers, tumour-synthesis widget

``hrseg.viz`` re-exports figures and ``slice_viewer``: ``viz.render_slice``, ``viz.montage``, ...
"""
from hrseg.viz.figures import (  # noqa: F401
    AXIS_LETTERS,
    AXIS_NAMES,
    HU_WINDOW,
    LABEL_RGB,
    LIVER_RGB,
    PREDICTION_CLASS_RGB,
    PREDICTION_RGB,
    PREDICTION_TUMOUR_RGB,
    TUMOUR_RGB,
    default_window,
    difference_figure,
    display_slice,
    display_spacing,
    grey,
    interesting_index,
    montage,
    montage_indices,
    outline,
    render_slice,
    save,
    window_to_level,
)
from hrseg.viz.viewer import (  # noqa: F401
    SliceViewer,
    slice_viewer,
)
