"""Write the study's notebooks (.ipynb, no outputs) from the cell lists below.

    python notebooks/build_notebooks.py          # rewrite notebooks/*.ipynb
    python notebooks/build_notebooks.py --check  # exit 1 if a committed notebook differs

Edit the cells here, not in JupyterLab, so the notebooks stay reviewable: many small cells that
call hrseg, one cell tagged ``parameters`` (papermill injects params/<dir>/<run>.yaml after it),
deterministic cell ids, no outputs or execution counts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# Every notebook starts its kernel in the repository root so the paths in params/ resolve the same
# under papermill (run from the root) and JupyterLab (kernel started in notebooks/).
CHDIR = '''import os
from pathlib import Path

if Path.cwd().name == "notebooks":  # JupyterLab starts the kernel here; paths are repo-relative
    os.chdir("..")'''

# Fake CPU devices must be requested before jax is imported (each notebook is its own kernel).
FAKE_DEVICES = CHDIR + '''
import re

flags = re.sub(r"--xla_force_host_platform_device_count=\\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # fake devices exist on the CPU platform only'''


def md(text: str):
    return ("markdown", text.strip("\n"))


def code(text: str):
    return ("code", text.strip("\n"))


def params(text: str):
    return ("parameters", text.strip("\n"))


# --------------------------------------------------------------------------------------------
# 01 — memory estimation
# --------------------------------------------------------------------------------------------

NB01 = [
    md("""
# 01 · Why partition: the memory of a full-resolution 3D U-Net

The motivating arithmetic of Hou et al. (2019), then the per-device memory of a U-Net training
step two ways — the analytic count of `hrseg.memory.estimate` and XLA's own figure for the
compiled step (`hrseg.memory.measure`, compiled on fake CPU devices from abstract inputs:
nothing is allocated) — for several resolutions and meshes; how per-device memory falls with the
number of devices for explicit halos, plain GSPMD and the ideal; the memory ablation of Wang,
Oda & Mori (2020); and the planner's answer for a device budget.
"""),
    params("""
devices = 64                   # fake CPU devices, requested before jax is imported
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
out_dir = "runs"               # figures and tables go to <out_dir>/01_memory_estimation/
"""),
    code(FAKE_DEVICES),
    code("""
%matplotlib inline
import jax
import jax.numpy as jnp
import numpy as np
from IPython.display import Markdown, display
from matplotlib.figure import Figure

from hrseg import memory, results, viz
from hrseg.nn import unet

GB, GiB, MiB = 1e9, memory.GiB, 2 ** 20
figures = Path(out_dir) / "01_memory_estimation"
figures.mkdir(parents=True, exist_ok=True)
assert jax.device_count() >= devices, "jax was imported before XLA_FLAGS was set: restart the kernel"
"""),
    md("""
## 137 GB for one layer

The output of a single 3×3×3 convolution with 64 filters on a batch of 8 volumes of 512³
voxels, in float16 — before any other layer, gradient or optimizer state:
"""),
    code("""
L = paper_layer
one_layer = memory.activation_bytes((L["batch"], L["size"], L["size"], L["size"]), L["filters"],
                                    jnp.dtype(L["dtype"]))
print(f"{L['batch']} × {L['size']}³ voxels × {L['filters']} filters × "
      f"{jnp.dtype(L['dtype']).itemsize} B = {one_layer:,} B = {one_layer / GB:.1f} GB "
      f"({one_layer / GiB:.0f} GiB)")
for p in (8, 64, 256, 512):
    print(f"  split over {p:3d} devices: {one_layer / p / GB:7.2f} GB each")
"""),
    md("""
## Analytic vs compiled, per resolution and mesh

Per-device bytes of one training step of the `model` preset (batch 1, Adafactor), halo
backend. *compiled* is XLA's `memory_analysis()` of the real jitted step (arguments + outputs −
aliased + temporaries); *analytic* counts what the backward pass keeps.
"""),
    code("""
compiled = {}  # (resolution, mesh, backend) -> memory.measure result, reused below


def measured(res, mesh, backend="halo"):
    key = (res, tuple(mesh), backend)
    if key not in compiled:
        compiled[key] = memory.measure(unet.preset(model), (res, res, res), mesh=tuple(mesh),
                                       batch=1, backend=backend)
    return compiled[key]
"""),
    code("""
rows = []
for res in resolutions:
    for mesh in meshes:
        est = memory.estimate(unet.preset(model), (res, res, res), mesh=tuple(mesh), batch=1)
        got = measured(res, mesh)
        rows.append({"resolution": f"{res}³", "mesh x·y·z": "·".join(map(str, mesh)),
                     "devices": int(np.prod(mesh)), "analytic MiB": est["total"] / MiB,
                     "compiled MiB": got["total"] / MiB,
                     "compiled / analytic": got["total"] / est["total"],
                     "compile s": got["compile_s"]})
results.write_csv(rows, figures / "analytic_vs_compiled.csv")
display(Markdown(results.markdown_table(rows, floatfmt=".1f")))
"""),
    md("""
## Per-device memory vs number of devices

The same step at `scaling_resolution` on more and more devices. *halo*: explicit halo exchange
(shard_map + ppermute); *gspmd*: plain jit with the volume sharded, XLA partitions; *ideal*:
every device keeps the whole training state (parameters, gradients, optimizer) and exactly
1/P of the single-device temporaries.
"""),
    code("""
res = scaling_resolution
single = measured(res, (1, 1, 1))
state = single["argument"] + single["output"] - single["alias"]
scaling = []
for mesh in scaling_meshes:
    p = int(np.prod(mesh))
    halo_b = measured(res, mesh)["total"]
    gspmd_b = measured(res, mesh, "gspmd")["total"] if p > 1 else halo_b
    scaling.append({"devices": p, "mesh x·y·z": "·".join(map(str, mesh)),
                    "halo MiB": halo_b / MiB, "gspmd MiB": gspmd_b / MiB,
                    "ideal MiB": (state + single["temp"] / p) / MiB})
results.write_csv(scaling, figures / "memory_vs_devices.csv")
display(Markdown(results.markdown_table(scaling, floatfmt=".1f")))
"""),
    code("""
fig = Figure(figsize=(6.5, 4), layout="constrained")
ax = fig.add_subplot()
p = [r["devices"] for r in scaling]
for key, style in (("halo MiB", "o-"), ("gspmd MiB", "s--"), ("ideal MiB", "k:")):
    ax.plot(p, [r[key] for r in scaling], style, label=key.split()[0])
ax.set(xscale="log", yscale="log", xlabel="devices", ylabel="MiB per device (compiled)",
       title=f"{model} U-Net training step, {res}³, batch 1")
ax.set_xticks(p, [str(v) for v in p])
ax.grid(alpha=0.3, which="both")
ax.legend()
viz.save(fig, figures / "memory_vs_devices.png")
fig
"""),
    md("""
## Wang et al.'s memory ablation

Single-device training step of their U-Net with each technique added in turn (their Table 1):
bottleneck blocks, separable convolutions, Compact ConvBlocks, in-place activated BatchNorm,
mixed precision. Fractions are of the baseline. *estimate* is the analytic count, *traced*
replaces its activations by what `jax.vjp` really saves (no compiling: any backend), and
*compiled* (with `wang_compiled`) is this machine's XLA step — on CPU it computes bf16
convolutions in float32 and packs its heap with gaps, so mixed precision shows less of its
saving there.
"""),
    code("""
ablation = memory.ablation(tuple(wang_shape), batch=1, compiled=wang_compiled)
results.write_csv(ablation, figures / "wang_ablation.csv")
print(f"input {'×'.join(map(str, wang_shape))}, batch 1")
print(memory.format_table(ablation))
"""),
    md("""
## The planner

Given a per-device budget and a number of devices, `hrseg.memory.plan` keeps the whole
volume and picks the mesh and the least intrusive memory techniques that fit.
"""),
    code("""
answer = memory.plan(int(budget_gib * GiB), budget_devices, budget_resolution)
print(answer.explain())
"""),
]

# --------------------------------------------------------------------------------------------
# 02 — halo correctness
# --------------------------------------------------------------------------------------------

NB02 = [
    md("""
# 02 · Halo exchange is exact

Spatial partitioning splits every activation of the U-Net over a mesh of devices; before each
convolution a device receives the margins (*halos*) of its neighbours (`hrseg.parallel.halo`). If that is
done right, the partitioned network **is** the unpartitioned network: same outputs, same
gradients, up to float rounding. This notebook checks it on fake CPU devices for several meshes,
draws the blocks and their halos, and counts the collectives in a compiled training step (halos
are `collective-permute`s; an `all-gather` would mean a device holds more than its block).
"""),
    params("""
devices = 8                  # fake CPU devices, requested before jax is imported
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
"""),
    code(FAKE_DEVICES),
    code("""
%matplotlib inline
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from IPython.display import Markdown, display
from jax import lax
from jax.sharding import PartitionSpec as P

from hrseg import data, results, viz
from hrseg.data import phantom
from hrseg.nn import losses, unet
from hrseg.parallel import halo, partition
from hrseg.train import step

figures = Path(out_dir) / "02_halo_correctness"
figures.mkdir(parents=True, exist_ok=True)
assert jax.device_count() >= devices, "jax was imported before XLA_FLAGS was set: restart the kernel"
jax.devices()
"""),
    md("""
## Forward and gradients, sharded vs unsharded

Two programs per mesh: one 3×3×3 convolution (`halo.conv` against `lax.conv_general_dilated`
with SAME padding) and the whole U-Net preset (logits with running statistics, and the gradient
of the training loss, whose BatchNorm uses the *global* batch statistics). Errors are relative
to the largest reference value. The probe loss `sum(sin(y))` gives every output element a
different cotangent.
"""),
    code("""
def rel_err(a, b):
    a, b = (np.asarray(t, np.float64) for t in (a, b))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def tree_err(a, b):
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def probe(f):
    return lambda *args: jnp.sum(jnp.sin(f(*args)))
"""),
    code("""
key_x, key_w, key_y = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(key_x, (2, *shape, 3))
w = jax.random.normal(key_w, (3, 3, 3, 3, 4))
dn = ("NDHWC", "DHWIO", "NDHWC")
ref_conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=dn,
                                                 precision=lax.Precision.HIGHEST)
ref_conv_grads = jax.grad(probe(ref_conv), argnums=(0, 1))(x, w)
"""),
    code("""
net = unet.build(unet.preset(model), in_channels=1, rngs=nnx.Rngs(0))
graphdef, params, rest = nnx.split(net, nnx.Param, ...)
images = jax.random.normal(key_x, (2, *shape, 1))
labels = jax.random.randint(key_y, (2, *shape), 0, 3)
loss_fn = losses.get("dice_ce", (1.0, 8.0, 16.0))
print(f"U-Net preset {model!r}: {unet.param_count(net):,} parameters")
"""),
    code("""
def unet_outputs(mesh, backend):
    xs, ys = step.place_batch(mesh, backend, images, labels)
    logits, _ = jax.jit(step.make_forward(graphdef, partition.backend_mesh(mesh, backend),
                                          backend))(params, rest, xs)
    loss = step.make_loss(graphdef, loss_fn, partition.backend_mesh(mesh, backend), backend)
    grads = jax.jit(jax.grad(lambda p: loss(p, rest, xs, ys, 1.0)[0]))(params)
    return logits, grads


one_device = partition.make_mesh((1, 1, 1), devices=jax.devices()[:1])
ref_logits, ref_grads = unet_outputs(one_device, "none")
"""),
    code("""
def compare(spatial, data):
    mesh = partition.make_mesh(spatial, data)
    vs = partition.volume_spec()
    conv = partition.spmd(halo.conv, mesh, "halo", (vs, P()), vs)
    xs = partition.shard(mesh, x)
    gx, gw = jax.jit(jax.grad(probe(conv), argnums=(0, 1)))(xs, w)
    logits, grads = unet_outputs(mesh, "halo")
    return {"mesh x·y·z × data": f"{'·'.join(map(str, spatial))} × {data}",
            "conv": rel_err(jax.jit(conv)(xs, w), ref_conv(x, w)),
            "conv ∂x": rel_err(gx, ref_conv_grads[0]), "conv ∂w": rel_err(gw, ref_conv_grads[1]),
            "U-Net logits": rel_err(logits, ref_logits), "U-Net ∂params": tree_err(grads, ref_grads)}


rows = [compare(m[:3], m[3]) for m in meshes]
"""),
    code("""
errors_md = results.markdown_table(rows, floatfmt=".1e")
(figures / "max_errors.md").write_text(errors_md)
results.write_csv(rows, figures / "max_errors.csv")
display(Markdown(errors_md))
"""),
    code("""
worst = max(v for r in rows for k, v in r.items() if k != "mesh x·y·z × data")
assert worst < 1e-4, f"sharded and unsharded differ by {worst:.1e}"
print(f"largest relative error over {len(rows)} meshes: {worst:.1e} (float32 rounding)")
"""),
    md("""
## The blocks and their halos on one slice

A phantom CT volume (windowed to [0, 1], as the network sees it) split over the picture mesh.
Left: the axial slice, the block borders, and dashed the region one device sees after the
exchange. Right: what each device really holds after `halo.halo_exchange` — its block plus a
ring received from its neighbours (tinted cyan); where the volume ends the ring is zeros
(red), which is exactly SAME zero padding.
"""),
    code("""
hu, _, _ = phantom.generate_case(0, (picture_size, picture_size, 8 * picture_mesh[2]))
volume = data.window(hu)[None, ..., None]                       # (1, X, Y, Z, 1) in [0, 1]
pmesh = partition.make_mesh(picture_mesh, devices=jax.devices()[:int(np.prod(picture_mesh))])
vs = partition.volume_spec()
h = picture_halo
exchange = partition.spmd(lambda v: halo.halo_exchange(v, [(h, h), (h, h), (0, 0)]),
                          pmesh, "halo", vs, vs)
padded = np.asarray(jax.jit(exchange)(partition.shard(pmesh, volume)))
padded.shape  # every block grew by 2 × halo in x and y
"""),
    code("""
(sx, sy), (X, Y) = picture_mesh[:2], volume.shape[1:3]
bx, by, z = X // sx, Y // sy, volume.shape[3] // 2
blocks = {(i, j): padded[0, i * (bx + 2 * h):(i + 1) * (bx + 2 * h),
                         j * (by + 2 * h):(j + 1) * (by + 2 * h), z, 0]
          for i in range(sx) for j in range(sy)}
zero_padded = np.pad(volume[0, :, :, z, 0], h)  # what SAME padding of the whole slice gives
for (i, j), b in blocks.items():  # each device's block + halo = its window of the padded slice
    np.testing.assert_array_equal(b, zero_padded[i * bx:(i + 1) * bx + 2 * h,
                                                 j * by:(j + 1) * by + 2 * h])
print(f"{len(blocks)} blocks of {bx}×{by} voxels + halo {h}: each equals its window of the "
      "zero-padded slice")
"""),
    code("""
def tile_rgb(i, j):
    \"\"\"Block (i, j) with its halo: ring from neighbours tinted cyan, outside the volume red.\"\"\"
    rgb = np.repeat(blocks[i, j][..., None], 3, axis=-1)
    rows = np.arange(-h, bx + h)[:, None] + i * bx            # global x of each tile row
    cols = np.arange(-h, by + h)[None, :] + j * by
    ring = np.ones(rgb.shape[:2], bool)
    ring[h:h + bx, h:h + by] = False
    outside = (rows < 0) | (rows >= X) | (cols < 0) | (cols >= Y)
    rgb[ring & ~outside] = 0.6 * rgb[ring & ~outside] + 0.4 * np.array([0.0, 0.8, 1.0])
    rgb[outside] = (0.6, 0.0, 0.0)
    return rgb
"""),
    code("""
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

fig = Figure(figsize=(11, 5.4), layout="constrained")
left, right = fig.subplots(1, 2)
left.imshow(volume[0, :, :, z, 0], cmap="gray", vmin=0, vmax=1)
for i in range(1, sx):
    left.axhline(i * bx - 0.5, color="orange", lw=1.5)
for j in range(1, sy):
    left.axvline(j * by - 0.5, color="orange", lw=1.5)
ci, cj = sx // 2, sy // 2
left.add_patch(Rectangle((cj * by - h - 0.5, ci * bx - h - 0.5), by + 2 * h, bx + 2 * h,
                         fill=False, ec="cyan", ls="--", lw=1.5))
left.set(xlim=(-h - 1, Y + h), ylim=(X + h, -h - 1), xlabel="array axis 2 (mesh axis y)",
         ylabel="array axis 1 (mesh axis x)",
         title=f"axial slice z={z}: {sx}×{sy} blocks; dashed: block ({ci}, {cj}) + halo")
left.title.set_fontsize(10)
"""),
    code("""
gap = 3
tx, ty = bx + 2 * h, by + 2 * h
canvas = np.ones((sx * tx + (sx - 1) * gap, sy * ty + (sy - 1) * gap, 3))
for i, j in blocks:
    canvas[i * (tx + gap):i * (tx + gap) + tx, j * (ty + gap):j * (ty + gap) + ty] = tile_rgb(i, j)
right.imshow(canvas, interpolation="nearest")
right.set(xticks=[], yticks=[], title=f"each device after halo_exchange (halo {h})")
right.title.set_fontsize(10)
fig.legend(handles=[Patch(color=(0.4, 0.72, 1.0), label="halo received from a neighbour"),
                    Patch(color=(0.6, 0, 0), label="halo outside the volume: zeros"),
                    Patch(color="orange", label="block borders")],
           loc="outside lower center", ncol=3, frameon=False)
viz.save(fig, figures / "halo_blocks.png")
fig
"""),
    md("""
## Collectives in the compiled training step

The whole training step of the U-Net (forward, loss, backward, optimizer) compiled for the
`hlo_mesh` from abstract inputs (nothing allocated). With explicit halos the only
communication is halo `collective-permute`s and the `all-reduce`s of norm statistics, loss and
weight gradients. Plain GSPMD sharding of the same step is shown for contrast.
"""),
    code("""
optimizer = optax.adam(1e-3)
_, state = step.init_state(net, optimizer)  # the same U-Net as above


def collectives(backend):
    mesh = partition.make_mesh(hlo_mesh, devices=jax.devices()[:int(np.prod(hlo_mesh))])
    train_step = step.make_train_step(graphdef, optimizer, loss_fn, mesh, backend)
    args = step.abstract_inputs(state, mesh, backend, (1, hlo_size, hlo_size, hlo_size, 1))
    hlo = train_step.lower(*args).compile().as_text()
    ops = ("collective-permute", "all-gather", "all-reduce", "reduce-scatter", "all-to-all")
    count = {op: len(re.findall(rf"\\b{op}(?:-start)?\\(", hlo)) for op in ops}
    return {"backend": backend, **count}


hlo_rows = [collectives(b) for b in hlo_backends]
display(Markdown(results.markdown_table(hlo_rows)))
"""),
    code("""
results.write_csv(hlo_rows, figures / "collectives.csv")
halo_row = next(r for r in hlo_rows if r["backend"] == "halo")
assert halo_row["all-gather"] == 0, "the halo step gathers activations"
assert halo_row["collective-permute"] > 0, "the halo step exchanges no halos"
print(f"halo step: {halo_row['collective-permute']} collective-permutes, no all-gather")
"""),
]

# --------------------------------------------------------------------------------------------
# 03 — augmentation
# --------------------------------------------------------------------------------------------

NB03 = [
    md("""
# 03 · The data and its augmentation

The embedded dataset is a synthetic abdominal CT phantom in the LiTS layout (`hrseg.data.phantom`),
read through the same path as LiTS (`hrseg.data.dataset`: canonical orientation, HU window, resampled
to the network grid). Training replaces a case's tumours by synthetic ones with some
probability (`hrseg.data.augment.synthesize_tumours`), then flips. This notebook shows one case
before and after synthesis, the statistics of the synthetic tumours over many draws, and the
flips; then the case in napari (with a display) or an ipywidgets slice viewer.
"""),
    params("""
data_root = "data/phantom"     # dataset folder; a phantom is written there when it is missing
phantom = {"cases": 8, "seed": 0, "shape": [256, 256, 128]}  # hrseg.data.phantom.write_dataset args
cache_dir = "data/cache"       # preprocessed volumes (hrseg.data.dataset)
resolution = [64, 64, 64]      # network grid the case is shown on
case = 0                       # index of the case shown
fraction = [0.05, 0.25]        # synthetic tumour share of the liver (augment.tumour_fraction)
draws = 16                     # synthesis draws for the statistics
open_napari = True             # open the case in napari when a display is available
out_dir = "runs"               # figures and tables go to <out_dir>/03_augmentation/
"""),
    code(CHDIR + """
%matplotlib inline
import jax
import numpy as np
from IPython.display import Markdown, display
from scipy import ndimage

from hrseg import data, pipeline, results, viz
from hrseg.data import augment
from hrseg.config import DataConfig

figures = Path(out_dir) / "03_augmentation"
figures.mkdir(parents=True, exist_ok=True)
"""),
    md("## One case on the network grid"),
    code("""
print(pipeline.ensure_phantom(data_root, **phantom))
cases = data.find_cases(data_root)
cfg = DataConfig(root=data_root, resolution=tuple(resolution), cache_dir=cache_dir)
volume = data.load_volume(cases[case], cfg)
image, label = np.asarray(volume.image), volume.label
print(f"{len(cases)} cases; case {volume.id}: source {volume.meta['shape']} voxels at "
      f"{np.round(volume.meta['spacing'], 2).tolist()} mm -> {image.shape}")
"""),
    code("""
fig = viz.montage(image, label, axis=2, n=6, title=f"case {volume.id} at {'×'.join(map(str, image.shape))}")
viz.save(fig, figures / "case.png")
fig
"""),
    md("""
## Tumour synthesis

The case's tumours are replaced by smooth random blobs covering a random share (in `fraction`)
of the liver, darker than the parenchyma by the case's own liver–tumour contrast. Outside the
liver the image is unchanged, so the difference image is zero there.
"""),
    code("""
synthesize = jax.jit(lambda key: augment.synthesize_tumours(key, image, label, tuple(fraction)))
new_image, new_label = (np.asarray(a) for a in synthesize(jax.random.key(0)))
assert np.array_equal(new_image[label == 0], image[label == 0]), "changed outside the liver"
fig = viz.difference_figure(image, new_image, label, new_label,
                            title="tumour synthesis (outlines: liver green, tumour red)")
viz.save(fig, figures / "synthesis_difference.png")
fig
"""),
    code("""
fig = viz.montage(new_image, new_label, axis=2, n=6, title="after synthesis")
viz.save(fig, figures / "synthesis_montage.png")
fig
"""),
    md("""
## Statistics of the synthetic tumours

For each draw: the tumour share of the liver, the number of separate tumours (26-connected
components) and the mean intensity drop from parenchyma to tumour in HU (the window maps
1024 HU to 1). The first row is the original case.
"""),
    code("""
def tumour_stats(img, lab, name):
    liver, tumour = lab >= 1, lab == 2
    _, blobs = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
    drop = (img[liver & ~tumour].mean() - img[tumour].mean()) * 1024 if tumour.any() else np.nan
    return {"draw": name, "tumour share of liver": tumour.sum() / max(liver.sum(), 1),
            "tumours": blobs, "intensity drop (HU)": float(drop)}


stats = [tumour_stats(image, label, "original")]
for d in range(draws):
    img, lab = synthesize(jax.random.key(d))
    stats.append(tumour_stats(np.asarray(img), np.asarray(lab), d))
"""),
    code("""
results.write_csv(stats, figures / "synthesis_stats.csv")
drawn = stats[1:]
share = np.array([r["tumour share of liver"] for r in drawn])
summary = {k: f"{np.nanmean([r[k] for r in drawn]):.3g} ± {np.nanstd([r[k] for r in drawn]):.2g}"
           for k in ("tumour share of liver", "tumours", "intensity drop (HU)")}
display(Markdown(results.markdown_table([stats[0], {"draw": f"{draws} draws", **summary}])))
assert np.all((share > 0) & (share <= 1)), share
"""),
    code("""
from matplotlib.figure import Figure

fig = Figure(figsize=(9, 3), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ax1.hist(share, bins=10, color="tab:red", alpha=0.7)
ax1.axvspan(*fraction, color="grey", alpha=0.15, label="requested range")
ax1.set(xlabel="tumour share of the liver", ylabel="draws")
ax1.legend(fontsize=8)
counts = [r["tumours"] for r in drawn]
ax2.hist(counts, bins=np.arange(min(counts), max(counts) + 2) - 0.5, color="tab:blue", alpha=0.7)
ax2.set(xlabel="separate tumours per draw")
viz.save(fig, figures / "synthesis_stats.png")
fig
"""),
    md("""
## Flips

`augment.flip_rotate` flips each axis with probability ½ (and may rotate by 180° in-plane);
image and label always move together. Four draws, each at its slice with the most tumour.
"""),
    code("""
import itertools


def flips_of(lab):
    \"\"\"Which axes of the original label were flipped to give ``lab``.\"\"\"
    for axes in itertools.chain.from_iterable(itertools.combinations(range(3), k) for k in range(4)):
        if np.array_equal(np.flip(label, axes) if axes else label, lab):
            return "".join("xyz"[a] for a in axes) or "none"
    return "?"
"""),
    code("""
fig = Figure(figsize=(11, 3.2), layout="constrained")
for ax, d in zip(fig.subplots(1, 4), range(4)):
    img, lab = (np.asarray(a) for a in augment.flip_rotate(jax.random.key(d), image, label))
    index = viz.interesting_index(lab, 2, lab.shape)
    ax.imshow(viz.render_slice(img, lab, axis=2, index=index))
    ax.set_title(f"draw {d}: flipped {flips_of(lab)} (z={index})", fontsize=9)
    ax.set_axis_off()
viz.save(fig, figures / "flips.png")
fig
"""),
    md("""
## Look around

With a display, napari opens the case from its NIfTI files through the hrseg plugin (CT with
voxel spacing, labels, and the *Synthesize tumours* dock widget). Otherwise — and always in an
executed notebook — the ipywidgets slice viewer below shows the synthesised case (axis, slice,
overlay and window/level controls; a static picture where no widget can run).
"""),
    code("""
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
"""),
    code("""
viz.slice_viewer(new_image, new_label)
"""),
]

# --------------------------------------------------------------------------------------------
# 04 — one training run
# --------------------------------------------------------------------------------------------

NB04 = [
    md("""
# 04 · One training run

Trains the U-Net of a run config (`hrseg.train.loop.train`: the same loop as `hrseg train -f
CONFIG`) on the phantom dataset at one resolution, then shows the loss and Dice curves, the
validation predictions over the CT, and the evaluation JSON. The run directory
`<out_dir>/<train.name>/` holds `config.yaml`, `metrics.jsonl`, the checkpoints with one
`eval_<step>.json` per evaluation (what notebook 05 averages) and `result.json`. Run again, it
resumes from its newest checkpoint (nothing left to do when it finished).
"""),
    params("""
config = "params/default/train_64.yaml"  # the run config (hrseg.config YAML)
overrides = []                 # hrseg train --set items applied on top of the config
phantom = {"cases": 8, "seed": 0, "shape": [256, 256, 128]}  # written to data.root if missing
data_root = ""                 # empty: the data.root of the config
cache_dir = ""                 # empty: the data.cache_dir of the config
show_cases = 2                 # validation cases drawn with their predictions
out_dir = "runs"               # the run goes to <out_dir>/<train.name>/
"""),
    code(CHDIR + """
%matplotlib inline
import json

import numpy as np
from IPython.display import Markdown, display
from matplotlib.figure import Figure

from hrseg import data, pipeline, results, train, viz
from hrseg.nn import unet
from hrseg.train import inference
from hrseg.config import load as load_config
"""),
    code("""
paths = [f"data.root={data_root}"] * bool(data_root) + [f"data.cache_dir={cache_dir}"] * bool(cache_dir)
cfg = load_config(config, [*overrides, *paths, f"train.out_dir={out_dir}"])
run_dir = Path(cfg.train.out_dir) / cfg.train.name
print(f"run {run_dir}: {'×'.join(map(str, cfg.data.resolution))} input, U-Net {cfg.model.preset} "
      f"({cfg.model.levels} levels, base {cfg.model.base}, "
      f"{unet.param_count(cfg.model, cfg.in_channels):,} parameters), "
      f"{cfg.train.steps} steps of batch {cfg.train.batch}, mesh {cfg.mesh.backend} "
      f"{'×'.join(map(str, cfg.mesh.spatial))} × data {cfg.mesh.data}")
"""),
    code("""
print(pipeline.ensure_phantom(cfg.data.root, **phantom))
"""),
    md("## Training"),
    code("""
result = train.train(cfg)
print(train.describe(result))
"""),
    md("""
## Curves

Training loss and the training-batch Dice of every step (thin; a moving average on top), and
the validation Dice global of each evaluation (markers).
"""),
    code("""
log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
steps = [r for r in log if "loss" in r]
evals = [r for r in log if r.get("eval")]
x = np.array([r["step"] for r in steps])


k = max(1, len(steps) // 20)  # moving-average window


def smooth(v):
    return x[k - 1:], np.convolve(np.asarray(v, float), np.ones(k) / k, mode="valid")
"""),
    code("""
fig = Figure(figsize=(11, 3.6), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ax1.plot(x, [r["loss"] for r in steps], lw=0.6, alpha=0.5)
ax1.plot(*smooth([r["loss"] for r in steps]), lw=1.8, color="tab:blue")
ax1.set(xlabel="step", ylabel="training loss", yscale="log", title=cfg.train.loss)
for organ, colour in (("liver", "tab:green"), ("tumour", "tab:red")):
    ax2.plot(x, [r[f"dice_{organ}"] for r in steps], lw=0.6, alpha=0.35, color=colour)
    ax2.plot([e["step"] for e in evals], [e["eval"][f"{organ}_dice_global"] for e in evals],
             "o-", color=colour, label=f"{organ}: validation Dice global")
ax2.set(xlabel="step", ylabel="Dice", ylim=(0, 1), title="training batch (thin) / validation")
ax2.legend(fontsize=8)
viz.save(fig, run_dir / "curves.png")
fig
"""),
    md("## Evaluation JSON (the newest checkpoint, validation cases)"),
    code("""
scores = {k: v for k, v in (result.eval or {}).items() if k in results.METRICS}
display(Markdown(results.markdown_table([scores])))
print(json.dumps(result.eval, indent=1)[:3000])
"""),
    md("""
## Validation predictions over the CT

The newest checkpoint segments whole validation volumes on the network grid (labels filled,
prediction outlined in yellow). The first one is also written back to the original CT grid as
NIfTI, so `hrseg view` shows it in napari next to the ground truth.
"""),
    code("""
cfg_run, graphdef, state, mesh, ckpt_step = train.load_run(run_dir)
val = data.load_dataset(cfg_run.data).val[:show_cases]
predict = inference.Predictor(cfg_run, graphdef, mesh)
predictions = predict(state, [np.asarray(v.image) for v in val])  # label volumes (X, Y, Z)
print(f"checkpoint step {ckpt_step}: {len(val)} validation case(s) {[v.id for v in val]}")
"""),
    code("""
figs = []
for v, p in zip(val, predictions):
    fig = viz.montage(np.asarray(v.image), v.label, p, axis=2, n=6,
                      title=f"validation case {v.id} (step {ckpt_step})")
    figs.append(viz.save(fig, run_dir / f"validation_{v.id}.png"))
    display(fig)
"""),
    code("""
if val:
    written = train.predict(run_dir, val[0].meta["image_path"])
    print(f"{written}\\nview it: hrseg view {run_dir}")
"""),
]

# --------------------------------------------------------------------------------------------
# 05 — results table
# --------------------------------------------------------------------------------------------

NB05 = [
    md("""
# 05 · Results table

Every training run directly under `runs_dir` (default: `out_dir`) becomes part of the
paper-style table (Hou et al. 2019): one row per network input resolution, tumour and liver
Dice per case and Dice global, each mean ± std over the row's runs (seeds) × their last `last`
evaluations (checkpoints); with the per-device memory of the step (analytic,
`hrseg.memory.estimate`), the median step time and the voxels per second. Runs of one
resolution with different recipes (not just another seed) get a row each.

With `params/default` (what `make run` runs) the two training runs are 120-step
demonstrations sized for the 15-minute budget on 2 CPU cores: the liver is learnt, the tumours
not yet (they appear after 200–300 steps). The 600-step study — tumour Dice rising from 32³ to
64³ — and its table are in the README (`hrseg table runs/study`).
"""),
    params("""
runs_dir = ""                  # empty: out_dir (the run directories directly in it)
last = 3                       # evaluations (checkpoints) averaged per run
paper_resolutions = [64, 128, 256, 512]  # reference: the paper's U-Net schedule on one device
out_dir = "runs"               # the table goes to <out_dir>/results/
"""),
    code(CHDIR + """
%matplotlib inline
from IPython.display import Markdown, display

from hrseg import memory, results, viz
from hrseg.nn import unet

root = Path(runs_dir or out_dir)
table_dir = Path(out_dir) / "results"
"""),
    code("""
rows = results.collect(root, last=last)
assert rows, f"no training runs with evaluations under {root}: run notebook 04 first"
for r in rows:
    print(f"{r['resolution']}: runs {', '.join(r['runs'])} ({r['n']} evaluations)")
"""),
    code("""
paths = results.write_table(rows, table_dir, title="Liver and tumour Dice vs input resolution")
display(Markdown(paths["md"].read_text()))
"""),
    code("""
fig = results.dice_figure(rows)
viz.save(fig, table_dir / "dice_vs_resolution.png")
fig
"""),
    md("""
## Memory vs resolution

The runs' training steps next to the paper's 3D U-Net schedule (one more level with half the
filters per doubling of the resolution, bfloat16, batch 1) on a single device: the curve that
spatial partitioning divides by the number of devices.
"""),
    code("""
reference = []
for res in paper_resolutions:
    est = memory.estimate(unet.preset("paper", res), (res, res, res), batch=1)
    reference.append({"resolution": f"{res}³", "voxels": res ** 3, "memory_bytes": est["total"],
                      "label": "paper schedule, 1 device (analytic)"})
fig = results.memory_figure(rows, reference)
viz.save(fig, table_dir / "memory_vs_resolution.png")
fig
"""),
    code("""
print(f"results table: {paths['md']} (also {paths['csv'].name}, {paths['png'].name})")
"""),
]

NOTEBOOKS: dict[str, list] = {
    "01_memory_estimation": NB01,
    "02_halo_correctness": NB02,
    "03_augmentation": NB03,
    "04_train": NB04,
    "05_results_table": NB05,
}


def build(name: str, cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                       "language": "python"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(cells):
        cid = f"{name[:2]}-{i:02d}"
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(text, id=cid)
        else:
            cell = nbformat.v4.new_code_cell(text, id=cid)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name, NOTEBOOKS[name])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {', '.join(stale)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
