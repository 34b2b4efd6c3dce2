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
# # 04 · One training run
#
# Trains the U-Net of a run config (`hrseg.train.loop.train`: the same loop as `hrseg train -f
# CONFIG`) on the phantom dataset at one resolution, then shows the loss and Dice curves, the
# validation predictions over the CT, and the evaluation JSON. The run directory
# `<out_dir>/<train.name>/` holds `config.yaml`, `metrics.jsonl`, the checkpoints with one
# `eval_<step>.json` per evaluation (what notebook 05 averages) and `result.json`. Run again, it
# resumes from its newest checkpoint (nothing left to do when it finished).

# %% tags=["parameters"]
config = "params/train/train_2d_16.yaml"  # the run config (hrseg.config YAML); make run passes its own
overrides = []                 # hrseg train --set items applied on top of the config
phantom = {"cases": 16, "seed": 0, "shape": [256, 256, 128]}  # written to data.root if missing
data_root = ""                 # empty: the data.root of the config
cache_dir = ""                 # empty: the data.cache_dir of the config
show_cases = 2                 # validation cases drawn with their predictions
out_dir = "runs"               # the run goes to <out_dir>/<train.name>/

# %%
from hrseg.workbench import pipeline

pipeline.notebook_setup()  # cwd: the repo root (JupyterLab starts kernels in notebooks/)

# %%
# %matplotlib inline
import json
from pathlib import Path

import numpy as np
from IPython.display import Markdown, display

from hrseg import data, train, viz
from hrseg.workbench import pipeline, results
from hrseg.nn import unet
from hrseg.train import inference
from hrseg.config import load as load_config

# %%
paths = [f"data.root={data_root}"] * bool(data_root) + [f"data.cache_dir={cache_dir}"] * bool(cache_dir)
cfg = load_config(config, [*overrides, *paths, f"train.out_dir={out_dir}"])
run_dir = Path(cfg.train.out_dir) / cfg.train.name
print(f"run {run_dir}: {'×'.join(map(str, cfg.data.resolution))} input, U-Net {cfg.model.preset} "
      f"({cfg.model.levels} levels, base {cfg.model.base}, "
      f"{unet.param_count(cfg.model, cfg.in_channels):,} parameters), "
      f"{cfg.train.steps} steps of batch {cfg.train.batch}, mesh {cfg.mesh.backend} "
      f"{'×'.join(map(str, cfg.mesh.spatial))} × data {cfg.mesh.data}")

# %%
print(pipeline.ensure_phantom(cfg.data.root, **phantom))

# %% [markdown]
# ## Training

# %%
result = train.train(cfg)
print(train.describe(result))

# %% [markdown]
# ## Curves
#
# Training loss and the training-batch Dice of every step (thin; a moving average on top), and
# the validation Dice global of each evaluation (markers).

# %%
log = train.read_metrics(run_dir / "metrics.jsonl")
fig = viz.training_curves(log, loss_name=cfg.train.loss)
viz.save(fig, run_dir / "curves.png")
fig

# %% [markdown]
# ## Evaluation JSON (the newest checkpoint, validation cases)

# %%
scores = {k: v for k, v in (result.eval or {}).items() if k in results.METRICS}
display(Markdown(results.markdown_table([scores])))
print(json.dumps(result.eval, indent=1)[:3000])

# %% [markdown]
# ## Validation predictions over the CT
#
# The newest checkpoint segments whole validation volumes on the network grid (labels filled,
# prediction outlined in yellow). The first one is also written back to the original CT grid as
# NIfTI, so `hrseg view` shows it in napari next to the ground truth.

# %%
cfg_run, graphdef, state, layout, ckpt_step = train.load_run(run_dir)
val = data.load_dataset(cfg_run.data).val[:show_cases]
predict = inference.Predictor(cfg_run, graphdef, layout)
predictions = predict(state, [np.asarray(v.image) for v in val])  # label volumes (X, Y, Z)
print(f"checkpoint step {ckpt_step}: {len(val)} validation case(s) {[v.id for v in val]}")

# %%
figs = []
for v, p in zip(val, predictions):
    fig = viz.montage(np.asarray(v.image), v.label, p, axis=2, n=6,
                      title=f"validation case {v.id} (step {ckpt_step})")
    figs.append(viz.save(fig, run_dir / f"validation_{v.id}.png"))
    display(fig)

# %%
if val:
    written = train.predict(run_dir, val[0].meta["image_path"])
    print(f"{written}\nview it: hrseg view {run_dir}")
