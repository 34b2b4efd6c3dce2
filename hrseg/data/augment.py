"""Augmentation: pure ``(key, image, label) -> (image, label)`` functions, jit-able, one case.

``image`` is the windowed [0, 1] volume the network sees, ``label`` its 0/1/2 map. Spatial
axes are the label's (``(X, Y, Z)``, or ``(X, Y)`` for 2D); an image may carry trailing
channel axes (``(X, Y, Z, 1)``, or ``(X, Y, slices)`` for 2D) that move with the voxel.

Tumour synthesis as Hou et al.'s released code does it (Mesh-TF ``experimental/data_aug_lib.py``,
``maybe_gen_fake_data_based_on_real_data``): with ``d = 1.15 × (mean liver − mean tumour)``
measured on the image the network sees (the HU window's [0, 1], or the KiTS z-score: whatever
``data.preprocess`` made of it, so ``d`` is in the network's units), real tumours are "removed"
by adding ``d × blurred tumour mask`` and new ones are darkened by ``d × blurred blob mask``;
removed tumours become liver, blobs tumour. The blur is the released one: a normalised box of
``max(1, resolution // 32)`` voxels per axis (``resolution``: the longest spatial axis; 2 at
64³, 16 at 512³), zero outside the volume, placed as TensorFlow's SAME padding places an
even-sized box. Like the released code, a case without tumour (or without liver), or whose
tumours are not darker than its liver (``d <= 1e-4``), is left as it is (no synthesis), and the
result is not clipped.

Kept differences from the released code (tests/test_augment.py tests each):

* every change is confined to the liver: voxels outside it are bit-identical (the released
  blurred masks reach ``k/2`` voxels past the liver's edge into the background);
* the blobs: a smooth B-spline field (field.py) thresholded so that a share drawn uniformly from
  ``augment.tumour_fraction`` (default 5–25 %) *of the liver* is tumour; the released code
  thresholds box-smoothed noise at ``resolution/32`` at the percentile of the *whole volume*
  with a share ``clip(N(0.01, 0.01) + N(0, 0.05), 0.05, 0.25)`` (mostly 5 %).

On a 2D stack ``(X, Y, slices)`` the change (computed on the centre slice's label) applies to
every slice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hrseg.config import AugmentConfig
from hrseg.data.field import field_nodes, smooth_field
from hrseg.metrics import IGNORE

MIN_DIFFERENCE = 1e-4      # released code: no synthesis unless 1.15 × contrast > 1e-4
BLUR_PER_RESOLUTION = 32   # released code: box blur of resolution // 32 voxels per axis


def blur_size(shape) -> int:
    """The box blur's width in voxels for spatial ``shape``: ``max(1, max(shape) // 32)``."""
    return max(1, max(int(n) for n in shape) // BLUR_PER_RESOLUTION)


def _blur(mask: jax.Array, k: int | None = None) -> jax.Array:
    """Normalised box blur of width ``k`` (default blur_size) on every axis, zeros outside the
    volume, placed as TF's SAME padding: ``(k - 1) // 2`` before, ``k // 2`` after. Separable
    running sums (cumsum), so the cost does not grow with ``k``."""
    x = mask.astype(jnp.float32)
    k = blur_size(x.shape) if k is None else int(k)
    if k <= 1:
        return x
    for ax in range(x.ndim):
        n = x.shape[ax]
        pad = [(0, 0)] * x.ndim
        pad[ax] = ((k - 1) // 2 + 1, k // 2)            # one more zero in front: the cumsum's 0
        c = jnp.cumsum(jnp.pad(x, pad), axis=ax)
        x = (jax.lax.slice_in_dim(c, k, k + n, axis=ax)
             - jax.lax.slice_in_dim(c, 0, n, axis=ax)) / k
    return x


def _threshold(field: jax.Array, inside: jax.Array, fraction: jax.Array) -> jax.Array:
    """The level t with ``fraction`` of the ``inside`` voxels above it (bisection)."""
    target = fraction * jnp.sum(inside)
    lo, hi = jnp.min(field), jnp.max(field)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        above = jnp.sum((field > mid) & inside)
        return jnp.where(above > target, mid, lo), jnp.where(above > target, hi, mid)

    return jax.lax.fori_loop(0, 30, body, (lo, hi))[1]


def _channels_last(mask: jax.Array, image: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (image.ndim - mask.ndim))


def liver_tumour_difference(image: jax.Array, label: jax.Array) -> jax.Array:
    """``1.15 × (mean liver − mean tumour)`` in the image's units; 0 without tumour or liver
    (the released code's NaN -> 0)."""
    x = image.reshape(label.shape + (-1,)).mean(-1) if image.ndim > label.ndim else image
    x = x.astype(jnp.float32)
    liver, tumour = label == 1, label == 2
    n_l, n_t = jnp.sum(liver), jnp.sum(tumour)
    mean_l = jnp.sum(jnp.where(liver, x, 0)) / jnp.maximum(n_l, 1)
    mean_t = jnp.sum(jnp.where(tumour, x, 0)) / jnp.maximum(n_t, 1)
    return jnp.where((n_l > 0) & (n_t > 0), 1.15 * (mean_l - mean_t), 0.0)


def synthesize_tumours(key, image, label, fraction=(0.05, 0.25), difference=None):
    """Replace the case's tumours by synthetic ones covering ``fraction`` of the liver.

    ``difference``: the intensity drop in the image's units (None: measured on the case, see
    liver_tumour_difference). ``d <= MIN_DIFFERENCE`` (no tumour, no liver, tumours not darker
    than the liver): ``(image, label)`` unchanged. Returns the input dtypes.
    """
    image, label = jnp.asarray(image), jnp.asarray(label)
    if image.shape[:label.ndim] != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape}: the image must be the "
                         f"label's shape plus optional trailing channels")
    d = (liver_tumour_difference(image, label) if difference is None
         else jnp.asarray(difference, jnp.float32))
    # One draw for everything: each random op costs XLA seconds of compile time on CPU.
    u = jax.random.uniform(key, (1 + field_nodes(label.ndim),), jnp.float32)
    frac = fraction[0] + (fraction[1] - fraction[0]) * u[0]
    liver = label >= 1
    field = smooth_field(u[1:], label.shape)
    blob = (field > _threshold(field, liver, frac)) & liver
    delta = d * (_blur(label == 2) - _blur(blob)) * liver
    out = image.astype(jnp.float32) + _channels_last(delta, image)
    out = jnp.where(_channels_last(liver, image), out, image)   # outside the liver: exact
    new_label = jnp.where(liver, jnp.where(blob, 2, 1), 0).astype(label.dtype)
    apply = d > MIN_DIFFERENCE
    return (jnp.where(apply, out.astype(image.dtype), image),
            jnp.where(apply, new_label, label))


def flip_rotate(key, image, label, flips: bool = True, rotate180: bool = True):
    """Random flip of each spatial axis (p = 1/2 each) and a 180° in-plane rotation.

    The rotation is a flip of x and y together, so with ``flips`` on it adds nothing to the
    distribution (all 2^n flip patterns are already equally likely); it matters alone.
    Image and label always move together; the same key applied twice is the identity.
    """
    image, label = jnp.asarray(image), jnp.asarray(label)
    n = label.ndim
    coin = jax.random.uniform(key, (n + 1,)) < 0.5
    flip = [coin[a] & flips for a in range(n)]
    if rotate180:
        turn = coin[n]
        flip[0], flip[1] = flip[0] ^ turn, flip[1] ^ turn
    for ax in range(n):
        image = jnp.where(flip[ax], jnp.flip(image, ax), image)
        label = jnp.where(flip[ax], jnp.flip(label, ax), label)
    return image, label


def split_key(key, synthesis_p: float):
    """How one case's key is used: ``(synthesise? (bool array), synthesis key, flip key)``.

    :func:`augment` and the napari synthesis widget both draw from here, so a seed shows in
    the widget the tumours the training augmentation would draw.
    """
    k_apply, k_synth, k_flip = jax.random.split(key, 3)
    return jax.random.uniform(k_apply) < synthesis_p, k_synth, k_flip


def augment_padded(key, image, label, cfg: AugmentConfig):
    """:func:`augment` of a padded case (buckets.pad): padding (label IGNORE) stays padding.

    Synthesis sees the padding as background (it changes only the liver); the flips move the
    padding mask with the voxels, and it is labelled IGNORE again afterwards."""
    label = jnp.asarray(label)
    padding = label < 0                                   # IGNORE (hrseg.metrics)
    image, new = augment(key, image, jnp.where(padding, 0, label), cfg)
    if cfg.flip or cfg.rotate180:
        _, _, k_flip = split_key(key, cfg.tumour_synthesis_p)
        _, padding = flip_rotate(k_flip, padding, padding, cfg.flip, cfg.rotate180)
    return image, jnp.where(padding, IGNORE, new).astype(label.dtype)


def augment(key, image, label, cfg: AugmentConfig):
    """Tumour synthesis with probability ``cfg.tumour_synthesis_p``, then flips/rotation."""
    image, label = jnp.asarray(image), jnp.asarray(label)
    synthesise, k_synth, k_flip = split_key(key, cfg.tumour_synthesis_p)
    if cfg.tumour_synthesis_p > 0:
        image, label = jax.lax.cond(
            synthesise,
            lambda im, lb: synthesize_tumours(k_synth, im, lb, tuple(cfg.tumour_fraction)),
            lambda im, lb: (im, lb), image, label)
    if cfg.flip or cfg.rotate180:
        image, label = flip_rotate(k_flip, image, label, cfg.flip, cfg.rotate180)
    return image, label
