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
# # 05 · Results table
#
# Every training run directly under `runs_dir` (default: `out_dir`) becomes part of the
# paper-style table (Hou et al. 2019): one row per network input resolution, tumour and liver
# Dice per case and Dice global, each mean ± std over the row's runs (seeds) × their last `last`
# evaluations (checkpoints); with the per-device memory of the step (analytic,
# `hrseg.memory.estimate`), the median step time and the voxels per second. Runs of one
# resolution with different recipes (not just another seed) get a row each.
#
# With `params/notebooks/default` (what `make run` runs) the three training runs are the study in 2D —
# 16², 32² and 64² axial slices × 5, one 600-step recipe — sized for the 15-minute budget on 2
# CPU cores (3D steps at 64³ are ~10× dearer there). The 3D study (32³, 64³, 600 steps) and its
# table are in docs/results.md (`hrseg table runs/study`).

# %% tags=["parameters"]
runs_dir = ""                  # empty: out_dir (the run directories directly in it)
last = 3                       # evaluations (checkpoints) averaged per run
paper_resolutions = [64, 128, 256, 512]  # reference: the paper's U-Net schedule on one device
out_dir = "runs"               # the table goes to <out_dir>/results/

# %%
from hrseg.workbench import pipeline

pipeline.notebook_setup()  # cwd: the repo root (JupyterLab starts kernels in notebooks/)

# %%
# %matplotlib inline
from pathlib import Path

from IPython.display import Markdown, display

from hrseg import memory, viz
from hrseg.workbench import lesion_table, results

root = Path(runs_dir or out_dir)
table_dir = Path(out_dir) / "results"

# %%
rows = results.collect(root, last=last)
assert rows, f"no training runs with evaluations under {root}: run notebook 04 first"
for r in rows:
    print(f"{r['resolution']}: runs {', '.join(r['runs'])} ({r['n']} evaluations)")

# %%
paths = results.write_table(rows, table_dir, title="Liver and tumour Dice vs input resolution")
display(Markdown(paths["md"].read_text()))

# %%
fig = results.dice_figure(rows)
viz.save(fig, table_dir / "dice_vs_resolution.png")
fig

# %% [markdown]
# ## Memory vs resolution
#
# The runs' training steps next to the paper's 3D U-Net schedule (one more level with half the
# filters per doubling of the resolution, bfloat16, batch 1) on a single device: the curve that
# spatial partitioning divides by the number of devices.

# %%
reference = memory.paper_schedule(paper_resolutions)  # one device, analytic
fig = results.memory_figure(rows, reference)
viz.save(fig, table_dir / "memory_vs_resolution.png")
fig

# %% [markdown]
# ## Lesions by size: why resolution matters
#
# Each evaluation also scores the reference lesions one by one (26-connected components of the
# tumour label on each case's original grid, `hrseg.lesions`): found or missed, binned by
# equivalent diameter. Detected means any predicted voxel on the lesion (LiTS); the Dice is
# per lesion. Small tumours vanish when the volume is down-sampled: the lines should part
# at the small end. Runs evaluated before this existed get it from `hrseg evaluate RUN_DIR`.

# %%
lesion_rows = lesion_table.collect(root, last=last)
if lesion_rows:
    lesion_paths = lesion_table.write(lesion_rows, table_dir)
    display(Markdown(lesion_paths["md"].read_text()))
else:
    print(f"no per-lesion evaluations under {root}")

# %%
# detection rate and per-lesion Dice against diameter, one line per resolution (lesions.png)
viz.detection_by_size(lesion_rows) if lesion_rows else None

# %%
print(f"results table: {paths['md']} (also {paths['csv'].name}, {paths['png'].name})")
