"""Coarse levels on fewer devices (hrseg/parallel/submesh.py, model.gather_below): the U-Net
whose thin levels run all-gathered on 8 fake devices == the unpartitioned model (logits,
gradients, batch statistics), for several gather plans, norms and meshes."""
import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_unet_sharded import _close, _run

from hrseg import memory
from hrseg.nn import unet
from hrseg.parallel import partition, submesh

X = jax.random.normal(jax.random.key(0), (2, 16, 8, 24, 1))   # shards 8×4×12 on 2×2×2
W = jax.random.normal(jax.random.key(1), (2, 16, 8, 24, 3))
BASE = dataclasses.replace(unet.preset("tiny"), levels=3)

# per-level blocks on 2×2×2: x 8, 4, 2 · y 4, 2, 1 · z 12, 6, 3
PLANS = {
    3: [(), ("y",), ("x", "y")],                       # mixed: one, then two axes
    5: [("y",), ("x", "y"), ("x", "y", "z")],          # from the first level on
    100: [("x", "y", "z")] * 3,                        # everything, head included
}


def _plan(cfg, spatial):
    mesh = partition.make_mesh(spatial)
    model = unet.build(cfg, 1)
    got = []
    f = jax.shard_map(lambda x: got.append(model.gather_plan(x.shape)) or x, mesh=mesh,
                      in_specs=P(*partition.volume_spec()), out_specs=P(*partition.volume_spec()))
    jax.eval_shape(f, X)
    return got[0]


@pytest.mark.parametrize("below", list(PLANS))
def test_plan_gathers_the_thin_axes(below):
    assert _plan(dataclasses.replace(BASE, gather_below=below), (2, 2, 2)) == PLANS[below]
    assert _plan(dataclasses.replace(BASE, gather_below=0), (2, 2, 2)) == [()] * 3


@pytest.mark.parametrize("below,extra", [
    (3, {}),
    (5, {"norm": "inplace_abn"}),
    (100, {"norm": "group", "norm_groups": 2}),
    (3, {"block": "compact", "norm": "instance", "reduction": 2}),
])
def test_gathered_levels_equal_one_device(below, extra):
    cfg = dataclasses.replace(BASE, **extra)
    ref = _run(cfg, (1, 1, 1), 1, "none", X, W)
    out = _run(dataclasses.replace(cfg, gather_below=below), (2, 2, 2), 1, "halo", X, W)
    _close(ref, out, 1e-4)


def test_gathered_levels_other_mesh_with_data_axis():
    cfg = dataclasses.replace(BASE, norm="inplace_abn")
    ref = _run(cfg, (1, 1, 1), 1, "none", X, W)
    _close(ref, _run(dataclasses.replace(cfg, gather_below=3), (1, 2, 2), 2, "halo", X, W), 1e-4)


def test_gathered_step_all_gathers_and_keeps_halos():
    cfg = dataclasses.replace(BASE, gather_below=3, norm="inplace_abn")
    m = memory.measure(cfg, (16, 16, 16), (2, 2, 2), batch=1, hlo=True)
    assert "all-gather" in m["hlo"]                             # the coarse levels
    assert "collective-permute" in m["hlo"]                     # the fine levels' halos


def test_gather_without_check_vma_is_refused():
    mesh = partition.make_mesh((2, 2, 2))
    spec = P(*partition.volume_spec())
    f = jax.shard_map(lambda x: submesh.gather(x, ("x",)), mesh=mesh, in_specs=spec,
                      out_specs=spec, check_vma=False)
    with pytest.raises(ValueError, match="check_vma=False"):
        jax.eval_shape(f, X)


def test_gather_scatter_round_trip():
    mesh = partition.make_mesh((2, 2, 2))
    spec = P(*partition.volume_spec())

    def f(x):
        g = submesh.gather(x, ("x", "z"))
        assert g.shape[1] == X.shape[1] and g.shape[3] == X.shape[3]
        assert submesh.whole(g) == {"x", "z"}
        return submesh.scatter(g, ("x", "z"))
    out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X))
