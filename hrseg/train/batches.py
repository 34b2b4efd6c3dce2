"""Training batches: their shape, the mesh check, and each step's rows as global arrays.

Everything a step consumes is a function of ``(seed, step)``: the cases (data.batch_for_step,
patches.Sampler or buckets.Sampler) and the augmentation key of each row
(``fold_in(fold_in(key(seed), step), row)``), so a resumed or multi-host run sees the batches
of one uninterrupted single-host run.
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from hrseg import data
from hrseg.config import Config
from hrseg.data import augment, buckets, patches
from hrseg.nn import unet
from hrseg.parallel import partition
from hrseg.train import distributed, inference


def batch_shape(cfg: Config) -> tuple[int, ...]:
    """Global ``(B, *spatial, C)`` of a training batch (spatial: the patch, if any).
    ``resample: native`` batches vary by bucket: spatial is then the smallest bucket, the
    padding multiple (inference.pad_multiple)."""
    if cfg.data.resample == "native":
        return (cfg.train.batch, *inference.pad_multiple(cfg), cfg.in_channels)
    return (cfg.train.batch, *(cfg.data.patch or cfg.data.resolution), cfg.in_channels)


def check_batch_shape(cfg: Config, mesh) -> None:
    """The batch must split over the run's mesh (``layout.mesh``) and pool evenly; the error
    names the config key. (Native-size batches are padded to fit: only the batch counts.)"""
    try:
        partition.check_divisible(batch_shape(cfg), mesh, unet.poolings_of(cfg.model))
    except ValueError as e:
        key = ("train.batch" if cfg.train.batch % mesh.shape["data"]
               else "data.patch" if cfg.data.patch else "data.resolution")
        raise ValueError(f"config key '{key}': {e}") from None


class Batches:
    """This process's training data: its batch rows of each step, augmented, as global arrays.

    A process loads only the rows its devices hold (distributed.local_rows); with one process
    that is the whole batch. ``resample: native``: each step's batch is one bucket's shape
    (buckets.Sampler), padded with IGNORE labels that augmentation keeps in place.
    """

    def __init__(self, cfg: Config, layout: partition.Layout):
        self.cfg = cfg
        ndim = cfg.model.dims
        self.shape = batch_shape(cfg)
        self.img_sharding = layout.sharding(partition.volume_spec(ndim), self.shape)
        self.lab_sharding = layout.sharding(partition.label_spec(ndim), self.shape[:-1])
        self.group, self.groups = distributed.local_rows(self.img_sharding, self.shape)
        if jax.process_count() > 1:
            b = self.shape[0] // self.groups
            print(f"process {jax.process_index()}/{jax.process_count()} loads batch rows "
                  f"{self.group * b}-{(self.group + 1) * b - 1} of {self.shape[0]}",
                  file=sys.stderr)
        self.ds = data.load_dataset(cfg.data, process_index=self.group,
                                    process_count=self.groups)
        self.native = cfg.data.resample == "native"
        self.sampler = (patches.Sampler(self.ds, cfg.data.patch, cfg.data.patch_foreground)
                        if cfg.data.patch else
                        buckets.Sampler(self.ds, inference.pad_multiple(cfg),
                                        cfg.data.buckets_per_octave) if self.native else None)
        aug = augment.augment_padded if self.native else augment.augment
        self._augment = jax.jit(lambda key, img, lab: aug(key, img, lab, cfg.augment))

    def key(self, step_: int, row: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.train.seed),
                                                     step_), row)

    def __call__(self, step_: int):
        t = self.cfg.train
        fetch = self.sampler or (lambda *a, **k: data.batch_for_step(self.ds, *a, **k))
        images, labels = fetch(step_, t.batch, t.seed, process_index=self.group,
                               process_count=self.groups)
        images, labels = np.array(images, np.float32), np.array(labels, np.int32)
        rows = images.shape[0]
        for i in range(rows):
            img, lab = self._augment(self.key(step_, self.group * rows + i), images[i], labels[i])
            images[i], labels[i] = np.asarray(img), np.asarray(lab)
        shape = self.shape
        if self.native:   # this step's bucket
            shape = (t.batch, *self.sampler.shape_of_step(step_, t.batch, t.seed), shape[-1])
        return (distributed.global_array(self.img_sharding, images, shape, self.group),
                distributed.global_array(self.lab_sharding, labels, shape[:-1], self.group))
