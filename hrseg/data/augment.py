"""Augmentation: pure ``(key, image, label) -> (image, label)`` functions, jit-able, one case.

``image`` is the windowed [0, 1] volume the network sees, ``label`` its 0/1/2 map. Spatial
axes are the label's (``(X, Y, Z)``, or ``(X, Y)`` for 2D); an image may carry trailing
channel axes (``(X, Y, Z, 1)``, or ``(X, Y, slices)`` for 2D) that move with the voxel.

Tumour synthesis (after Hou et al.): with ``d = 1.15 × (mean liver − mean tumour)`` of the
case, real tumours are "removed" by adding ``d × blurred tumour mask``, new ones are blobs of
a smooth random field thresholded at the percentile that covers 5–25 % of the liver, darkened
by ``d × blurred blob mask``; removed tumours become liver, blobs tumour.
Every change is confined to the liver, so voxels outside it are bit-identical. On a 2D stack
``(X, Y, slices)`` the change (computed on the centre slice's label) applies to every slice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hrseg.config import AugmentConfig
from hrseg.data.field import field_nodes, smooth_field
from hrseg.metrics import IGNORE

# Intensity drop used when a case has no tumour (or no liver) to measure it on, in window
# units: 1.15 × 40 HU / 1024 HU ≈ 0.045. 40 HU is a typical liver − tumour contrast
# (portal-venous liver ~100–110 HU, hypodense metastases/HCC ~60–70 HU); with the default
# window HU [-512, 512] -> [0, 1] one HU is 1/1024. The phantom's tumours are 20–50 HU darker.
DEFAULT_DIFFERENCE = 1.15 * 40.0 / 1024.0
_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _blur(mask: jax.Array) -> jax.Array:
    """Binomial 5-tap blur (sigma 1 voxel) on every axis, zero outside: soft mask edges."""
    x = mask.astype(jnp.float32)
    for ax in range(x.ndim):
        n = x.shape[ax]
        pad = [(0, 0)] * x.ndim
        pad[ax] = (2, 2)
        xp = jnp.pad(x, pad)
        x = sum(w * jax.lax.slice_in_dim(xp, i, i + n, axis=ax) for i, w in enumerate(_BINOMIAL))
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
    """``1.15 × (mean liver − mean tumour)``; DEFAULT_DIFFERENCE without tumour or liver."""
    x = image.reshape(label.shape + (-1,)).mean(-1) if image.ndim > label.ndim else image
    x = x.astype(jnp.float32)
    liver, tumour = label == 1, label == 2
    n_l, n_t = jnp.sum(liver), jnp.sum(tumour)
    mean_l = jnp.sum(jnp.where(liver, x, 0)) / jnp.maximum(n_l, 1)
    mean_t = jnp.sum(jnp.where(tumour, x, 0)) / jnp.maximum(n_t, 1)
    return jnp.where((n_l > 0) & (n_t > 0), 1.15 * (mean_l - mean_t), DEFAULT_DIFFERENCE)


def synthesize_tumours(key, image, label, fraction=(0.05, 0.25), difference=None):
    """Replace the case's tumours by synthetic ones covering ``fraction`` of the liver.

    ``difference``: the intensity drop in window units (None: measured on the case, see
    liver_tumour_difference). Returns ``(image, label)`` with the input dtypes.
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
    out = jnp.clip(image.astype(jnp.float32) + _channels_last(delta, image), 0.0, 1.0)
    out = jnp.where(_channels_last(liver, image), out, image)   # outside the liver: exact
    new_label = jnp.where(liver, jnp.where(blob, 2, 1), 0).astype(label.dtype)
    return out.astype(image.dtype), new_label


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
