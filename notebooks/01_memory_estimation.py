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
# # 01 · Why partition: the memory of a full-resolution 3D U-Net
#
# The motivating arithmetic of Hou et al. (2019), then the per-device memory of a U-Net training
# step two ways — the analytic count of `hrseg.memory.estimate` and XLA's own figure for the
# compiled step (`hrseg.memory.measure`, compiled on fake CPU devices from abstract inputs:
# nothing is allocated) — for several resolutions and meshes; how per-device memory falls with the
# number of devices for explicit halos, plain GSPMD and the ideal; the memory ablation of Wang,
# Oda & Mori (2020); and the planner's answer for a device budget.

# %% tags=["parameters"]
devices = 64                   # devices of the meshes: real GPUs/TPUs, else fake CPU devices
fake_devices = False           # True: fake CPU devices even on a GPU/TPU
paper_layer = {"batch": 8, "size": 512, "filters": 64, "dtype": "float16"}  # the 137 GB layer
model = "mtf"                  # hrseg.nn.unet preset of the compiled measurements
resolutions = [64, 128]        # cube edges compared analytic vs compiled
meshes = [[1, 1, 1], [2, 2, 2], [4, 4, 4]]  # spatial meshes (x, y, z) compared
scaling_resolution = 128       # cube edge of the memory-vs-devices curve
scaling_meshes = [[1, 1, 1], [2, 2, 2], [4, 4, 4]]  # its meshes (1, 8, 64 devices)
wang_shape = [256, 256, 152]   # input of the Wang et al. ablation (single device, analytic)
wang_compiled = False          # also compile every ablation row (slow at full size)
budget_gib = 16                # planner: memory per device (GiB)
budget_devices = 64            # planner: number of devices
budget_resolution = 512        # planner: cube edge (the paper preset schedule)
budget_compile = "auto"        # planner: confirm by compiling ("auto" | "here"), None: estimate only
out_dir = "runs"               # figures and tables go to <out_dir>/01_memory_estimation/

# %%
from hrseg.workbench import pipeline

pipeline.notebook_setup(devices, fake_devices)  # cwd: the repo root; devices before jax starts

# %%
# %matplotlib inline
from pathlib import Path

import jax
import jax.numpy as jnp
from IPython.display import Markdown, display

from hrseg import memory, viz
from hrseg.workbench import results
from hrseg.runtime import devices as hrseg_devices

# %%
GB, GiB = 1e9, memory.GiB
figures = Path(out_dir) / "01_memory_estimation"
figures.mkdir(parents=True, exist_ok=True)
print(hrseg_devices.describe(jax.devices()))
meshes = hrseg_devices.usable_meshes(meshes, jax.device_count())
scaling_meshes = hrseg_devices.usable_meshes(scaling_meshes, jax.device_count())

# %% [markdown]
# ## 137 GB for one layer
#
# The output of a single 3×3×3 convolution with 64 filters on a batch of 8 volumes of 512³
# voxels, in float16 — before any other layer, gradient or optimizer state:

# %%
L = paper_layer
one_layer = memory.activation_bytes((L["batch"], L["size"], L["size"], L["size"]), L["filters"],
                                    jnp.dtype(L["dtype"]))
print(f"{L['batch']} × {L['size']}³ voxels × {L['filters']} filters × "
      f"{jnp.dtype(L['dtype']).itemsize} B = {one_layer:,} B = {one_layer / GB:.1f} GB "
      f"({one_layer / GiB:.0f} GiB)")
for p in (8, 64, 256, 512):
    print(f"  split over {p:3d} devices: {one_layer / p / GB:7.2f} GB each")

# %% [markdown]
# ## Analytic vs compiled, per resolution and mesh
#
# Per-device bytes of one training step of the `model` preset (batch 1, Adafactor), halo
# backend. *compiled* is XLA's `memory_analysis()` of the real jitted step (arguments + outputs −
# aliased + temporaries); *analytic* counts what the backward pass keeps.

# %%
compiled = memory.Compiled(model)  # memory.measure of each (resolution, mesh, backend), once
rows = memory.analytic_vs_compiled(compiled, resolutions, meshes)
results.write_csv(rows, figures / "analytic_vs_compiled.csv")
display(Markdown(results.markdown_table(rows, floatfmt=".1f")))

# %% [markdown]
# ## Per-device memory vs number of devices
#
# The same step at `scaling_resolution` on more and more devices. *halo*: explicit halo exchange
# (shard_map + ppermute); *gspmd*: plain jit with the volume sharded, XLA partitions; *ideal*:
# every device keeps the whole training state (parameters, gradients, optimizer) and exactly
# 1/P of the single-device temporaries.

# %%
scaling = memory.memory_vs_devices(compiled, scaling_resolution, scaling_meshes)
results.write_csv(scaling, figures / "memory_vs_devices.csv")
display(Markdown(results.markdown_table(scaling, floatfmt=".1f")))

# %%
fig = viz.memory_vs_devices_figure(
    scaling, title=f"{model} U-Net training step, {scaling_resolution}³, batch 1")
viz.save(fig, figures / "memory_vs_devices.png")
fig

# %% [markdown]
# ## Real peak bytes on the device
#
# On a GPU or TPU: one real training step of the `model` preset at `scaling_resolution` on one
# device, and the allocator's peak (`memory_stats()["peak_bytes_in_use"]`, one measurement per
# process; set `XLA_PYTHON_CLIENT_PREALLOCATE=false`), to set beside the compiled figure of the
# 1-device row above. A CPU has no allocator statistics.

# %%
from hrseg.memory import peak
from hrseg.nn import unet

real = peak.train_step_peak_bytes(unet.preset(model), (scaling_resolution,) * 3)
print("CPU: no allocator statistics" if real is None else
      f"real peak of one step on {jax.devices()[0].device_kind}: {real / GiB:.2f} GiB")

# %% [markdown]
# ## Wang et al.'s memory ablation
#
# Single-device training step of their U-Net with each technique added in turn (their Table 1):
# bottleneck blocks, separable convolutions, Compact ConvBlocks, in-place activated BatchNorm,
# mixed precision (fp16 with loss scaling, as their AMP). Fractions are of the baseline.
# *estimate* is the analytic count, *traced* replaces its activations by what `jax.vjp` really
# saves (no compiling: any backend), and *compiled* (with `wang_compiled`) is this machine's XLA
# step — on CPU it computes 16-bit convolutions in float32 and packs its heap with gaps, so
# mixed precision shows less of its saving there.

# %%
ablation = memory.ablation(tuple(wang_shape), batch=1, compiled=wang_compiled)
results.write_csv(ablation, figures / "wang_ablation.csv")
print(f"input {'×'.join(map(str, wang_shape))}, batch 1")
print(memory.format_table(ablation))

# %% [markdown]
# Beside Wang et al.'s Table 1, row by row, at their three inputs (96³, 256×256×152, and
# 256×256×full: the largest bucket of 45–234 slices): parameters and our analytic estimate,
# with Wang's nvidia-smi GB. Compare the fractions of each baseline, not the absolute figures
# (nvidia-smi counts the CUDA context and PyTorch's cache; docs/papers-wang.md).

# %%
comparison = memory.paper_comparison()
print(memory.format_comparison(comparison))

# %% [markdown]
# ## The planner
#
# Given a per-device budget and a number of devices, `hrseg.memory.plan` keeps the whole
# volume and picks the mesh and the least intrusive memory techniques that fit. The analytic
# estimate answers in seconds, within −7 %…+10 % of XLA:CPU's compiled step over a grid of
# steps (benchmarks/results/memory_grid.json); with `budget_compile` the planner confirms its
# pick by compiling the step on abstract
# inputs (nothing allocated; in a subprocess with fake CPU devices when this kernel has too
# few) and picks by XLA's figure: it walks down the techniques while the compiled step still
# fits, or up when it does not. It prints both figures and says which one it used.

# %%
answer = memory.plan(int(budget_gib * GiB), budget_devices, budget_resolution,
                     compile=budget_compile)
print(answer.explain())
