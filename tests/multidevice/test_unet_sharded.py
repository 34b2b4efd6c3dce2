"""The tiny U-Net on 8 fake devices (halo backend) == on one device: logits, gradients and BN
running statistics, for every block / norm / precision policy; the compiled halo training step
exchanges halos and never all-gathers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrseg import memory
from hrseg.nn import unet
from hrseg.parallel import partition
from hrseg.train import step

X = jax.random.normal(jax.random.key(0), (2, 16, 8, 24, 1))   # odd-ish: shards 8×4×12 …
W = jax.random.normal(jax.random.key(1), (2, 16, 8, 24, 3))
TINY = unet.preset("tiny")

# every block, norm and policy at least once (one compile each on 2 busy cores)
CASES = {
    "plain-batch-fp32": {},
    "compact-abn": {"block": "compact", "norm": "inplace_abn", "reduction": 2},
    "separable-group": {"block": "separable", "norm": "group", "norm_groups": 2},
    "bottleneck-instance-relu": {"block": "bottleneck", "norm": "instance", "activation": "relu",
                                 "reduction": 2},
    "plain-none-fp16": {"norm": "none", "precision": "fp16"},
    "plain-batch-bf16": {"precision": "bf16"},
    # Wang's reconstruction: 3³ stride-2 conv down, nearest 2× + 3³ conv up, 1-3-1 bottleneck
    "wang-bottleneck-convdown-resizeup": {"block": "bottleneck", "reduction": 2,
                                          "bottleneck_convs": 1, "downsample": "conv",
                                          "upsample": "resize_conv"},
}
# of the largest |value| in the logits / in all gradients / in all statistics: a gradient
# that cancels to ~0 (2-channel BN scale of the tiny net) carries the others' rounding
TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}


def _run(cfg, spatial, data, backend, x=X, w=W):
    model = unet.build(cfg, x.shape[-1], nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    layout = partition.layout(partition.make_mesh(spatial, data), backend)
    fwd = step.make_forward(graphdef, layout, cfg.dims, train=True)

    def loss(p, r, x):
        y, new_rest = fwd(p, r, x)
        return jnp.sum(y * w), (y, new_rest)
    (_, (y, new_rest)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest, x)
    return y, grads, new_rest


def _close(ref, out, tol):
    for name, a, b in zip(("logits", "grads", "batch stats"), ref, out):
        scale = max((float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(a)), default=0) + 1e-6
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(v, np.float32), np.asarray(u, np.float32),
                                       atol=tol * scale, rtol=0, err_msg=name)


_REFS = {}


def _ref(case):
    if case not in _REFS:
        _REFS[case] = _run(dataclasses.replace(TINY, **CASES[case]), (1, 1, 1), 1, "none")
    return _REFS[case]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_2x2x2_equals_one_device(case):
    cfg = dataclasses.replace(TINY, **CASES[case])
    _close(_ref(case), _run(cfg, (2, 2, 2), 1, "halo"), TOL[cfg.precision])


@pytest.mark.parametrize("case,spatial,data", [("plain-batch-fp32", (1, 2, 2), 2),
                                               ("compact-abn", (1, 2, 4), 1),
                                               ("plain-batch-bf16", (1, 2, 2), 2)])
def test_other_meshes_equal_one_device(case, spatial, data):
    cfg = dataclasses.replace(TINY, **CASES[case])
    _close(_ref(case), _run(cfg, spatial, data, "halo"), TOL[cfg.precision])


def test_unet2d_sharded_equals_one_device():
    cfg = dataclasses.replace(TINY, dims=2, norm="inplace_abn")
    x = jax.random.normal(jax.random.key(2), (2, 12, 20, 5))
    w = jax.random.normal(jax.random.key(3), (2, 12, 20, 3))
    ref = _run(cfg, (1, 1, 1), 1, "none", x, w)
    _close(ref, _run(cfg, (2, 2, 1), 2, "halo", x, w), 1e-4)


def test_halo_training_step_has_no_all_gather():
    cfg = dataclasses.replace(TINY, levels=3, norm="inplace_abn")
    m = memory.measure(cfg, (16, 16, 16), (2, 2, 2), batch=1, hlo=True)
    assert "all-gather" not in m["hlo"]
    assert "collective-permute" in m["hlo"]                     # the halos
    assert m["temp"] > 0 and m["mesh"] == (1, 2, 2, 2)
