"""Phantom generator figures as JSON: time per case and the tumour size distribution.

    python benchmarks/phantom_stats.py --cases 24 [--seed 0] [--write DIR]

Generates the cases of ``hrseg phantom --cases N --seed S`` at the default shape (512×512×
80–200) one at a time on one thread, times each, and measures its tumours as connected
components of label 2: count per case, equivalent-sphere diameter (6V/π)^(1/3) in mm, and how
many still have a voxel after nearest-neighbour resampling to 32³ / 64³ / 128³ (what the network
sees). ``--write DIR`` also times ``write_dataset`` (generation + NIfTI writing, its threads).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
import time

import numpy as np
from scipy import ndimage

from hrseg import data
from hrseg.config import DataConfig
from hrseg.data import nifti, phantom, resample


def _tumours(label: np.ndarray, affine: np.ndarray) -> tuple[list[float], dict[int, int]]:
    voxel = float(np.prod(nifti.spacing_of(affine)))
    comps, n = ndimage.label(label == 2)
    if n == 0:
        return [], {}
    sizes = np.bincount(comps.ravel())[1:] * voxel
    diam = [(6 * v / math.pi) ** (1 / 3) for v in sizes]
    survive = {}
    can, can_aff = nifti.to_canonical(comps, affine)
    for r in (32, 64, 128):
        low = data.grid_for(can.shape, can_aff, DataConfig(resolution=(r, r, r)))
        kept = np.unique(resample.apply(low, np.ascontiguousarray(can).astype(np.int32), 0))
        survive[r] = int((kept > 0).sum())
    return diam, survive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", help="also time write_dataset into this folder")
    args = p.parse_args()
    times, counts, diam, shapes = [], [], [], []
    kept = {32: 0, 64: 0, 128: 0}
    for i in range(args.cases):
        t0 = time.perf_counter()
        hu, label, affine = phantom.generate_case(phantom.case_seed(args.seed, i))
        times.append(time.perf_counter() - t0)
        shapes.append(hu.shape[2])
        d, s = _tumours(label, affine)
        counts.append(len(d))
        diam += d
        for r in kept:
            kept[r] += s.get(r, 0)
    d = np.array(diam)
    bins = [0, 5, 10, 20, 40, 80, 1e9]
    hist = {(f"{lo:g}-{hi:g}" if hi < 1e9 else f">{lo:g}"): int(((d >= lo) & (d < hi)).sum())
            for lo, hi in itertools.pairwise(bins)}
    out = {
        "cases": args.cases, "seed": args.seed, "cpu_count": os.cpu_count(),
        "slices": {"min": int(min(shapes)), "max": int(max(shapes))},
        "generate_s_per_case": {"mean": round(float(np.mean(times)), 2),
                                "min": round(float(np.min(times)), 2),
                                "max": round(float(np.max(times)), 2)},
        "tumours_total": int(d.size),
        "tumours_per_case": counts,
        "cases_without_tumour": int(sum(c == 0 for c in counts)),
        "equivalent_diameter_mm": {
            "min": round(float(d.min()), 1), "p10": round(float(np.percentile(d, 10)), 1),
            "median": round(float(np.median(d)), 1), "p90": round(float(np.percentile(d, 90)), 1),
            "max": round(float(d.max()), 1),
            "histogram": hist} if d.size else {},
        "tumours_with_a_voxel_at": {f"{r}^3": kept[r] for r in kept},
    }
    if args.write:
        folder = tempfile.mkdtemp(dir=args.write)
        t0 = time.perf_counter()
        phantom.write_dataset(folder, args.cases, seed=args.seed)
        wall = time.perf_counter() - t0
        out["write_dataset_s"] = {"total": round(wall, 1), "per_case": round(wall / args.cases, 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
