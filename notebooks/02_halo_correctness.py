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
# # 02 · Halo exchange is exact
#
# Spatial partitioning splits every activation of the U-Net over a mesh of devices; before each
# convolution a device receives the margins (*halos*) of its neighbours (`hrseg.parallel.halo`). If that is
# done right, the partitioned network **is** the unpartitioned network: same outputs, same
# gradients, up to float rounding. This notebook checks it on fake CPU devices for several meshes,
# draws the blocks and their halos, and counts the collectives in a compiled training step (halos
# are `collective-permute`s; an `all-gather` would mean a device holds more than its block).

# %% tags=["parameters"]
devices = 8                  # devices of the meshes: real GPUs/TPUs, else fake CPU devices
fake_devices = False         # True: fake CPU devices even on a GPU/TPU
meshes = [[2, 1, 1, 1], [2, 2, 2, 1], [1, 2, 4, 1], [8, 1, 1, 1], [2, 2, 1, 2]]  # x, y, z, data
shape = [16, 16, 16]         # X, Y, Z of the compared volumes (batch 2)
model = "tiny"               # hrseg.nn.unet preset compared end to end
picture_size = 64            # edge of the volume in the blocks-and-halos picture
picture_mesh = [2, 2, 1]     # its mesh (x, y, z)
picture_halo = 3             # halo width drawn (a 3³ conv needs 1; wider is easier to see)
hlo_mesh = [2, 2, 2]         # mesh of the compiled training step
hlo_size = 32                # its volume edge
hlo_backends = ["halo", "gspmd"]  # compiled steps compared
out_dir = "runs"             # figures and tables go to <out_dir>/02_halo_correctness/

# %%
from hrseg.workbench import pipeline

pipeline.notebook_setup(devices, fake_devices)  # cwd: the repo root; devices before jax starts

# %%
# %matplotlib inline
from pathlib import Path

import jax
from flax import nnx
from IPython.display import Markdown, display

from hrseg import atomic, data, viz
from hrseg.workbench import results
from hrseg.runtime import devices as hrseg_devices
from hrseg.data import phantom
from hrseg.nn import losses, unet
from hrseg.train import equivalence

# %%
figures = Path(out_dir) / "02_halo_correctness"
figures.mkdir(parents=True, exist_ok=True)
print(hrseg_devices.describe(jax.devices()))
meshes = hrseg_devices.usable_meshes(meshes, jax.device_count())

# %% [markdown]
# ## Forward and gradients, sharded vs unsharded
#
# Two programs per mesh: one 3×3×3 convolution (`halo.conv` against `lax.conv_general_dilated`
# with SAME padding) and the whole U-Net preset (logits with running statistics, and the gradient
# of the training loss, whose BatchNorm uses the *global* batch statistics). Errors are relative
# to the largest reference value. The probe loss `sum(sin(y))` gives every output element a
# different cotangent.

# %%
net = unet.build(unet.preset(model), in_channels=1, rngs=nnx.Rngs(0))
loss_fn = losses.get("dice_ce", (1.0, 8.0, 16.0))
print(f"U-Net preset {model!r}: {unet.param_count(net):,} parameters")

# %%
comparison = equivalence.Comparison(net, (2, *shape), loss_fn)  # references on one device
rows = [comparison.row(m[:3], m[3]) for m in meshes]

# %%
errors_md = results.markdown_table(rows, floatfmt=".1e")
atomic.write_text(figures / "max_errors.md", errors_md)
results.write_csv(rows, figures / "max_errors.csv")
display(Markdown(errors_md))

# %%
worst = equivalence.worst(rows)
assert worst < 1e-4, f"sharded and unsharded differ by {worst:.1e}"
print(f"largest relative error over {len(rows)} meshes: {worst:.1e} (float32 rounding)")

# %% [markdown]
# ## The blocks and their halos on one slice
#
# A phantom CT volume (windowed to [0, 1], as the network sees it) split over the picture mesh.
# Left: the axial slice, the block borders, and dashed the region one device sees after the
# exchange. Right: what each device really holds after `halo.halo_exchange` — its block plus a
# ring received from its neighbours (tinted cyan); where the volume ends the ring is zeros
# (red), which is exactly SAME zero padding.

# %%
hu, _, _ = phantom.generate_case(0, (picture_size, picture_size, 8 * picture_mesh[2]))
volume = data.window(hu)                                   # (X, Y, Z) in [0, 1]
z = volume.shape[2] // 2
blocks = viz.halo_blocks(volume, picture_mesh, picture_halo)  # device (i, j) -> block + halo at z
expected = viz.padded_windows(volume[:, :, z], picture_mesh, picture_halo)  # SAME zero padding
assert all((blocks[k] == expected[k]).all() for k in blocks), "a halo differs from zero padding"
print(f"{len(blocks)} blocks + halo {picture_halo}: each equals its window of the zero-padded slice")

# %%
fig = viz.halo_figure(volume[:, :, z], blocks, picture_halo)
viz.save(fig, figures / "halo_blocks.png")
fig

# %% [markdown]
# ## Collectives in the compiled training step
#
# The whole training step of the U-Net (forward, loss, backward, optimizer) compiled for the
# `hlo_mesh` from abstract inputs (nothing allocated). With explicit halos the only
# communication is halo `collective-permute`s and the `all-reduce`s of norm statistics, loss and
# weight gradients. Plain GSPMD sharding of the same step is shown for contrast.

# %%
hlo_rows = [equivalence.collectives(net, loss_fn, hlo_mesh, b, hlo_size) for b in hlo_backends]
display(Markdown(results.markdown_table(hlo_rows)))

# %%
results.write_csv(hlo_rows, figures / "collectives.csv")
halo_row = next(r for r in hlo_rows if r["backend"] == "halo")
assert halo_row["all-gather"] == 0, "the halo step gathers activations"
assert halo_row["collective-permute"] > 0, "the halo step exchanges no halos"
print(f"halo step: {halo_row['collective-permute']} collective-permutes, no all-gather")
