# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The data and its augmentation
#
# The embedded dataset is a synthetic abdominal CT phantom in the LiTS layout (`hrseg.data.phantom`),
# read through the same path as LiTS (`hrseg.data.dataset`: canonical orientation, HU window, resampled
# to the network grid). Training replaces a case's tumours by synthetic ones with some
# probability (`hrseg.data.augment.synthesize_tumours`), then flips. This notebook shows one case
# before and after synthesis, the statistics of the synthetic tumours over many draws, and the
# flips; then the case in napari (with a display) or an ipywidgets slice viewer.

# %% tags=["parameters"]
data_root = "data/phantom"     # dataset folder; a phantom is written there when it is missing
phantom = {"cases": 16, "seed": 0, "shape": [256, 256, 128]}  # hrseg.data.phantom.write_dataset args
cache_dir = "data/cache"       # preprocessed volumes (hrseg.data.dataset)
resolution = [64, 64, 64]      # network grid the case is shown on
case = 0                       # index of the case shown
fraction = [0.05, 0.25]        # synthetic tumour share of the liver (augment.tumour_fraction)
draws = 16                     # synthesis draws for the statistics
open_napari = True             # open the case in napari when a display is available
out_dir = "runs"               # figures and tables go to <out_dir>/03_augmentation/

# %%
from hrseg.workbench import pipeline

pipeline.notebook_setup()  # cwd: the repo root (JupyterLab starts kernels in notebooks/)

# %%
# %matplotlib inline
from pathlib import Path

import jax
import numpy as np
from IPython.display import Markdown, display

from hrseg import data, viz
from hrseg.workbench import pipeline, results
from hrseg.data import augment
from hrseg.config import DataConfig

figures = Path(out_dir) / "03_augmentation"
figures.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## One case on the network grid

# %%
print(pipeline.ensure_phantom(data_root, **phantom))
cases = data.find_cases(data_root)
cfg = DataConfig(root=data_root, resolution=tuple(resolution), cache_dir=cache_dir)
volume = data.load_volume(cases[case], cfg)
image, label = np.asarray(volume.image), volume.label
print(f"{len(cases)} cases; case {volume.id}: source {volume.meta['shape']} voxels at "
      f"{np.round(volume.meta['spacing'], 2).tolist()} mm -> {image.shape}")

# %%
fig = viz.montage(image, label, axis=2, n=6, title=f"case {volume.id} at {'×'.join(map(str, image.shape))}")
viz.save(fig, figures / "case.png")
fig

# %% [markdown]
# ## Tumour synthesis
#
# The case's tumours are replaced by smooth random blobs covering a random share (in `fraction`)
# of the liver, darker than the parenchyma by the case's own liver–tumour contrast. Outside the
# liver the image is unchanged, so the difference image is zero there.

# %%
synthesize = jax.jit(lambda key: augment.synthesize_tumours(key, image, label, tuple(fraction)))
new_image, new_label = (np.asarray(a) for a in synthesize(jax.random.key(0)))
assert np.array_equal(new_image[label == 0], image[label == 0]), "changed outside the liver"
fig = viz.difference_figure(image, new_image, label, new_label, hu_window=volume.hu_window,
                            title="tumour synthesis (outlines: liver green, tumour red)")
viz.save(fig, figures / "synthesis_difference.png")
fig

# %%
fig = viz.montage(new_image, new_label, axis=2, n=6, title="after synthesis")
viz.save(fig, figures / "synthesis_montage.png")
fig

# %% [markdown]
# ## Statistics of the synthetic tumours
#
# For each draw: the tumour share of the liver, the number of separate tumours (26-connected
# components) and the mean intensity drop from parenchyma to tumour in HU (from the case's
# `data.hu_window`, which maps 1024 HU to 1 by default). The first row is the original case.

# %%
stats = [viz.tumour_stats(image, label, "original", hu_window=volume.hu_window)]
for d in range(draws):
    stats.append(viz.tumour_stats(*synthesize(jax.random.key(d)), d, hu_window=volume.hu_window))
results.write_csv(stats, figures / "synthesis_stats.csv")
display(Markdown(results.markdown_table([stats[0], viz.summarize(stats[1:], f"{draws} draws")])))
assert all(0 < r["tumour share of liver"] <= 1 for r in stats[1:]), stats

# %%
fig = viz.synthesis_stats_figure(stats[1:], fraction)
viz.save(fig, figures / "synthesis_stats.png")
fig

# %% [markdown]
# ## Flips
#
# `augment.flip_rotate` flips each axis with probability ½ (and may rotate by 180° in-plane);
# image and label always move together. Four draws, each at its slice with the most tumour.

# %%
flips = [augment.flip_rotate(jax.random.key(d), image, label) for d in range(4)]
fig = viz.flips_figure(label, flips)  # titles: the axes flipped relative to the original
viz.save(fig, figures / "flips.png")
fig

# %% [markdown]
# ## Look around
#
# With a display, napari opens the case from its NIfTI files through the hrseg plugin (CT with
# voxel spacing, labels, and the *Synthesize tumours* dock widget). Otherwise — and always in an
# executed notebook — the ipywidgets slice viewer below shows the synthesised case (axis, slice,
# overlay and window/level controls; a static picture where no widget can run).

# %%
from hrseg.viz.napari import _view as napari_view

if open_napari and napari_view.has_display():
    get_ipython().run_line_magic("gui", "qt")
    import napari
    viewer = napari.Viewer(title=f"case {volume.id}")
    napari_view.open_case(viewer, cases[case].image)
    viewer.window.add_plugin_dock_widget("hrseg", "Synthesize tumours")
else:
    print("napari skipped: " + ("no display (DISPLAY is not set)" if open_napari
                                else "open_napari is off") + "; the slice viewer follows")

# %%
viz.slice_viewer(new_image, new_label, spacing=volume.spacing, hu_window=volume.hu_window)
