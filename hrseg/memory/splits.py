"""Which meshes split a volume: the spatial splits of n devices, and why none does.

Every device's block must pool evenly (a multiple of ``2^poolings`` voxels per axis); an axis
that does not split evenly over its devices is padded in the step (parallel/uneven.py). The
planner (planner.py) orders the splits by padding, then by halo surface.
"""
from __future__ import annotations

import math

from hrseg.parallel import uneven


def primes(n: int) -> list[int]:
    """The distinct prime factors of ``n``."""
    return [p for p in range(2, n + 1) if n % p == 0 and all(p % q for q in range(2, p))]


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def spatial_splits(n: int, shape, levels: int, ndim: int = 3) -> list[tuple[int, int, int]]:
    """Splits ``(sx, sy, sz)`` of ``n`` devices for a shape that pools evenly ``levels`` times:
    the least padding first (an axis that does not split evenly is padded in the step,
    parallel/uneven.py), then the most cube-like shards (smallest halo surface). Padding may
    at most double an axis: it never has more than twice as many devices as pooled blocks
    (``2 ceil(size / 2^levels)``), so 65536 devices do not "split" a 64³ volume."""
    out = []
    blocks = [2 * -(-s // 2 ** levels) for s in shape]
    for sx in divisors(n):
        for sy in divisors(n // sx):
            sz = n // (sx * sy)
            split = (sx, sy, sz)
            if ndim == 2 and sz != 1:
                continue
            if any(k > b for k, b in zip(split, blocks)):
                continue
            if all(s % 2 ** levels == 0 for s in shape):
                local = [uneven.padded_size(s, k, levels) // k for s, k in zip(shape, split)]
                surface = sum(math.prod(local) / d for d in local)
                out.append((math.prod(local), surface, split))
    return [s for *_, s in sorted(out)]


def why_not(n_devices: int, shape, batch: int, levels: int) -> str:
    """Why no mesh of ``n_devices`` (data × spatial) splits a ``shape`` volume at ``batch``
    pooled ``levels`` times, and the nearest device counts that would."""
    mult = 2 ** levels
    text = "×".join(map(str, shape))

    def works(n: int) -> bool:
        return any(spatial_splits(n // d, shape, levels, len(shape))
                   for d in divisors(n) if batch % d == 0)

    # the most devices any split can use (see spatial_splits), times the batch
    most = batch * math.prod(2 * -(-s // mult) for s in shape)
    below = next((n for n in range(min(n_devices - 1, most), 0, -1) if works(n)), None)
    above = next((n for n in range(n_devices + 1, min(2 * n_devices, most) + 1)
                  if works(n)), None)
    near = " or ".join(str(n) for n in (below, above) if n)
    blocks = [s // mult for s in shape]
    stuck = [p for p in primes(n_devices) if all(b % p for b in blocks) and batch % p]
    detail = (f" ({n_devices} has the factor {stuck[0]}, which divides none of the "
              f"{', '.join(map(str, blocks))} blocks per axis nor the batch)" if stuck else "")
    return (f"{n_devices} devices cannot split a {text} volume (batch {batch}): "
            f"each device's block must be a whole multiple of 2^{levels} = {mult} "
            f"voxels per axis (one per pooling), so the devices on an axis must divide its "
            f"size / {mult}{detail}"
            + (f"; nearest device counts that work: {near}" if near else ""))
