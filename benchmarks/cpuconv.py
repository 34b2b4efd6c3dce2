"""One 3D conv on the CPU: XLA's ``lax.conv_general_dilated`` vs hrseg's two CPU formulations
(``hrseg.parallel.cpuconv``): ``direct``, the C++ direct conv (``parallel/native.py``, what
``model.conv: auto`` runs where it is built) and ``wide``, the wide-image 2D convs (where it is
not, and ``model.conv: wide``); forward, input gradient and weight gradient apart (the two
halves of the custom VJP), and ``all``: forward + both gradients through ``jax.vjp``.

    python benchmarks/cpuconv.py --json                    # 64³ × 32 -> 32, 3³ (~1 min)
    python benchmarks/cpuconv.py --json --size 32 --cin 64 --cout 64
    python benchmarks/cpuconv.py --json --upconv           # the k2s2 up-conv, 32³ × 64 -> 64³ × 32

The input and weight gradients are the ones ``_conv_bwd`` runs (wide: the weight gradient as
flat matmuls from 16 input channels, XLA's backprop-filter conv below). Seconds are the median
of ``--repeats`` after one warm-up call, each pass jitted on its own; ``*_ratio`` is direct ÷
XLA, ``wide_*_ratio`` wide ÷ XLA (below 1: hrseg faster); ``max_rel_err`` the largest
difference of any result of either from XLA's, relative to XLA's largest magnitude. Without
the direct conv (``native_conv`` in the JSON says why) only ``wide`` is timed.

``--upconv``: the k2s2 up-conv (``halo.conv_transpose``), its forward and both gradients,
as the einsum (``impl="xla"``: accelerators, GSPMD) and as the CPU's one matmul over the
flattened voxels (``impl="wide"``), its cotangent built as in the step: the next conv's three
input-gradient taps summed and sliced to the up-conv's half of the skip concatenation.
``upconv_ratio`` is flat ÷ einsum.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial


def _median(f, args, repeats):
    import jax
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(size: int, cin: int, cout: int, kernel: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from hrseg.parallel import cpuconv, native

    rng = np.random.default_rng(0)
    xp = jnp.asarray(rng.standard_normal((1,) + (size + kernel - 1,) * 3 + (cin,)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel,) * 3 + (cin, cout)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.standard_normal((1,) + (size,) * 3 + (cout,)), jnp.float32)
    def xla(xp, w):
        return lax.conv_general_dilated(xp, w, (1, 1, 1), "VALID",
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    passes = {
        "xla": {
            "forward": lambda xp, w, g: xla(xp, w),
            "input_grad": lambda xp, w, g: jax.vjp(lambda x: xla(x, w), xp)[1](g)[0],
            "weight_grad": lambda xp, w, g: jax.vjp(lambda v: xla(xp, v), w)[1](g)[0],
            "all": lambda xp, w, g: jax.vjp(xla, xp, w)[1](g),
        },
    }
    for name, direct in (("direct", True), ("wide", False)):
        if direct and not native.available():
            continue
        f = partial(cpuconv.valid_conv3d, direct=direct)
        passes[name] = {  # the custom VJP's two halves apart, then the whole of it
            "forward": lambda xp, w, g, d=direct: cpuconv._forward(xp, w, None, d),
            "input_grad": lambda xp, w, g, d=direct: cpuconv._conv_bwd(None, d, (xp, w), g)[0],
            "weight_grad": lambda xp, w, g, d=direct: cpuconv._conv_bwd(None, d, (xp, w), g)[1],
            "all": lambda xp, w, g, f=f: jax.vjp(f, xp, w)[1](g),
        }
    out, results = {}, {}
    for name, fns in passes.items():
        for p, f in fns.items():
            f = jax.jit(f)
            results[name, p] = jax.tree.leaves(f(xp, w, g))   # arguments, not constants:
            out[f"{name}_{p}_s"] = round(_median(f, (xp, w, g), repeats), 6)  # µs: toy sizes take tens
    for p in ("forward", "input_grad", "weight_grad", "all"):
        for name, prefix in (("direct", ""), ("wide", "wide_")):
            if name in passes:
                out[f"{prefix}{p}_ratio"] = round(out[f"{name}_{p}_s"] / out[f"xla_{p}_s"], 3)
    out["max_rel_err"] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                             for name in passes if name != "xla" for p in passes["xla"]
                             for a, b in zip(results[name, p], results["xla", p]))
    out["native_conv"] = native.status()
    out.update(size=size, cin=cin, cout=cout, kernel=kernel, backend=jax.default_backend())
    return out


def measure_upconv(size: int, cout: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hrseg.parallel import halo
    rng = np.random.default_rng(0)
    h, cin = size // 2, 2 * cout
    x = jnp.asarray(rng.standard_normal((1, h, h, h, cin)), jnp.float32)    # (1, S/2³, 2C)
    w = jnp.asarray(rng.standard_normal((2, 2, 2, cin, cout)) * 0.1, jnp.float32)
    taps = [jnp.asarray(rng.standard_normal((1,) + (size + 2,) * 3 + (cin,)), jnp.float32)
            for _ in range(3)]                                                # (1, S+2³, 2C)

    def grads(impl):
        def loss(x, w, a, b, c):
            g = (a + b + c)[:, 1:size + 1, 1:size + 1, 1:size + 1, :cout]     # (1, S³, C)
            return jnp.sum(halo.conv_transpose(x, w, impl=impl) * g)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    out, res = {}, {}
    for name, impl in (("einsum", "xla"), ("flat", "wide")):
        f = grads(impl)
        res[name] = f(x, w, *taps)
        out[f"upconv_{name}_s"] = round(_median(f, (x, w, *taps), repeats), 6)
    out["upconv_ratio"] = round(out["upconv_flat_s"] / out["upconv_einsum_s"], 3)
    out["max_rel_err"] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                             for a, b in zip(res["flat"], res["einsum"]))
    out.update(size=size, cin=cin, cout=cout, backend=jax.default_backend())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    ap.add_argument("--size", type=int, default=64, help="output cube size S (default 64)")
    ap.add_argument("--cin", type=int, default=32)
    ap.add_argument("--cout", type=int, default=32)
    ap.add_argument("--kernel", type=int, default=3, help="odd cubic kernel size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--upconv", action="store_true",
                    help="time the k2s2 up-conv (einsum vs flat matmul) instead, output S³ × "
                         "--cout from (S/2)³ × 2·cout")
    ap.add_argument("--out", help="also write the JSON to this file")
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import record
    res = (measure_upconv(a.size, a.cout, a.repeats) if a.upconv
           else measure(a.size, a.cin, a.cout, a.kernel, a.repeats))
    record.emit({**record.header(), **res}, a.out, indent=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
