"""The blocks of a spatially partitioned volume and the halos each device receives.

``halo_blocks`` runs the real exchange (``hrseg.parallel.halo.halo_exchange`` under shard_map)
on an ``(X, Y, Z)`` volume split over an x × y mesh and returns what every device holds on the
middle z slice: its block plus a ring of ``h`` voxels from its neighbours, zeros where the volume
ends — exactly SAME zero padding, so each equals its window of the zero-padded slice
(``padded_windows``). ``halo_figure`` draws both.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HALO_RGB = (0.0, 0.8, 1.0)   # tint of the ring received from a neighbour
OUTSIDE_RGB = (0.6, 0.0, 0.0)  # the ring outside the volume (zeros)


def halo_blocks(volume, mesh_xy: Sequence[int], h: int) -> dict[tuple[int, int], np.ndarray]:
    """Device ``(i, j)`` -> its block of the middle z slice of ``volume`` ``(X, Y, Z)`` after the
    halo exchange: ``(X / sx + 2h, Y / sy + 2h)``. Needs ``sx · sy`` devices."""
    import jax  # here: `import hrseg.viz` must not start jax before a notebook sets XLA_FLAGS

    from hrseg.parallel import halo, partition
    volume = np.asarray(volume, np.float32)
    sx, sy = (int(s) for s in mesh_xy[:2])
    mesh = partition.make_mesh((sx, sy, 1), devices=jax.devices()[:sx * sy])
    vs = partition.volume_spec()
    exchange = partition.spmd(lambda v: halo.halo_exchange(v, [(h, h), (h, h), (0, 0)]),
                              mesh, "halo", vs, vs)
    padded = np.asarray(jax.jit(exchange)(partition.shard(mesh, volume[None, ..., None])))
    bx, by, z = volume.shape[0] // sx, volume.shape[1] // sy, volume.shape[2] // 2
    tx, ty = bx + 2 * h, by + 2 * h  # (1, X + 2h·sx, Y + 2h·sy, Z, 1): blocks side by side
    return {(i, j): padded[0, i * tx:(i + 1) * tx, j * ty:(j + 1) * ty, z, 0]
            for i in range(sx) for j in range(sy)}


def padded_windows(slice2d, mesh_xy: Sequence[int], h: int) -> dict[tuple[int, int], np.ndarray]:
    """What SAME zero padding gives each block: its window of ``slice2d`` padded by ``h``."""
    slice2d = np.asarray(slice2d)
    sx, sy = (int(s) for s in mesh_xy[:2])
    bx, by = slice2d.shape[0] // sx, slice2d.shape[1] // sy
    zero_padded = np.pad(slice2d, h)
    return {(i, j): zero_padded[i * bx:(i + 1) * bx + 2 * h, j * by:(j + 1) * by + 2 * h]
            for i in range(sx) for j in range(sy)}


def tile_rgb(blocks: dict, i: int, j: int, h: int, slice_shape: Sequence[int]) -> np.ndarray:
    """Block ``(i, j)`` with its halo as RGB: the ring from neighbours tinted, outside red."""
    block = blocks[i, j]
    bx, by = block.shape[0] - 2 * h, block.shape[1] - 2 * h
    rgb = np.repeat(block[..., None], 3, axis=-1).astype(np.float64)
    rows = np.arange(-h, bx + h)[:, None] + i * bx            # global x of each tile row
    cols = np.arange(-h, by + h)[None, :] + j * by
    ring = np.ones(rgb.shape[:2], bool)
    ring[h:h + bx, h:h + by] = False
    outside = (rows < 0) | (rows >= slice_shape[0]) | (cols < 0) | (cols >= slice_shape[1])
    rgb[ring & ~outside] = 0.6 * rgb[ring & ~outside] + 0.4 * np.array(HALO_RGB)
    rgb[outside] = OUTSIDE_RGB
    return rgb


def halo_canvas(blocks: dict, h: int, slice_shape: Sequence[int], gap: int = 3) -> np.ndarray:
    """Every device's tile on a white canvas, laid out as the mesh, ``gap`` pixels apart."""
    sx, sy = (max(k[a] for k in blocks) + 1 for a in (0, 1))
    tx, ty = next(iter(blocks.values())).shape
    canvas = np.ones((sx * tx + (sx - 1) * gap, sy * ty + (sy - 1) * gap, 3))
    for i, j in blocks:
        canvas[i * (tx + gap):i * (tx + gap) + tx,
               j * (ty + gap):j * (ty + gap) + ty] = tile_rgb(blocks, i, j, h, slice_shape)
    return canvas


def halo_figure(slice2d, blocks: dict, h: int):
    """Left: the axial slice, the block borders and (dashed) one block + halo. Right: what each
    device holds after the exchange. Both in the radiological display orientation of every
    other figure (viz.figures.display_slice: x runs right to left, y bottom to top).
    ``slice2d``: an ``(X, Y)`` slice. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle
    slice2d = np.asarray(slice2d)
    X, Y = slice2d.shape
    sx, sy = (max(k[a] for k in blocks) + 1 for a in (0, 1))
    bx, by = X // sx, Y // sy
    fig = Figure(figsize=(11, 5.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(slice2d.T[::-1, ::-1], cmap="gray", vmin=0, vmax=1)  # rows: Y-1-y, cols: X-1-x
    for i in range(1, sx):
        left.axvline(X - i * bx - 0.5, color="orange", lw=1.5)
    for j in range(1, sy):
        left.axhline(Y - j * by - 0.5, color="orange", lw=1.5)
    ci, cj = sx // 2, sy // 2
    left.add_patch(Rectangle((X - (ci + 1) * bx - h - 0.5, Y - (cj + 1) * by - h - 0.5),
                             bx + 2 * h, by + 2 * h, fill=False, ec="cyan", ls="--", lw=1.5))
    left.set(xlim=(-h - 1, X + h), ylim=(Y + h, -h - 1), xticks=[], yticks=[],
             xlabel="← x (mesh axis x; patient's right on the left)",
             ylabel="y (mesh axis y) →")
    left.set_title(f"{sx}×{sy} blocks; dashed: block ({ci}, {cj}) + halo", fontsize=10)
    canvas = halo_canvas(blocks, h, (X, Y))                               # (x, y, RGB)
    right.imshow(canvas.transpose(1, 0, 2)[::-1, ::-1], interpolation="nearest")
    right.set(xticks=[], yticks=[])
    right.set_title(f"each device after halo_exchange (halo {h})", fontsize=10)
    tint = 0.6 + 0.4 * np.array(HALO_RGB)
    fig.legend(handles=[Patch(color=tuple(tint), label="halo received from a neighbour"),
                        Patch(color=OUTSIDE_RGB, label="halo outside the volume: zeros"),
                        Patch(color="orange", label="block borders")],
               loc="outside lower center", ncol=3, frameon=False)
    return fig
