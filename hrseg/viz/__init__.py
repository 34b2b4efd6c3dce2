"""Pictures: matplotlib figures, the ipywidgets slice viewer, the napari plugin.

    figures         slice rendering (radiological convention), montages, difference figures
    halo_figures    the blocks of a partitioned volume and the halos each device receives
    augment_figures statistics of synthetic tumours over draws, flips
    curves          memory against devices, training curves, lesions found by size
    viewer          the ipywidgets slice viewer with a static PNG fallback
    napari/         npe2 plugin: NIfTI reader, label layers, tumour-synthesis widget

``hrseg.viz`` re-exports them: ``viz.render_slice``, ``viz.montage``, ``viz.halo_figure``, ...
"""
from hrseg.viz.augment_figures import (  # noqa: F401
    flipped_axes,
    flips_figure,
    summarize,
    synthesis_stats_figure,
    tumour_stats,
)
from hrseg.viz.curves import (  # noqa: F401
    detection_by_size,
    memory_vs_devices_figure,
    moving_average,
    training_curves,
)
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
from hrseg.viz.halo_figures import (  # noqa: F401
    halo_blocks,
    halo_canvas,
    halo_figure,
    padded_windows,
)
from hrseg.viz.viewer import (  # noqa: F401
    SliceViewer,
    slice_viewer,
)
