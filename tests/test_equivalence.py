"""hrseg.train.equivalence on one device: the error measures and the collective counter.

Several meshes (and a planted halo bug the check must catch): tests/multidevice/
test_equivalence_sharded.py.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrseg.train import equivalence


def test_rel_err_and_tree_err_by_hand():
    # |[1, 2.5] - [1, 2]| max 0.5, over max |b| = 2 -> 0.25
    assert equivalence.rel_err([1.0, 2.5], [1.0, 2.0]) == pytest.approx(0.25)
    assert equivalence.rel_err([0.0], [0.0]) == 0.0
    a = {"w": np.array([1.0, 4.0]), "b": np.array([3.0])}
    b = {"w": np.array([1.0, 4.0]), "b": np.array([2.0])}
    assert equivalence.tree_err(a, b) == pytest.approx(0.5)       # 1 / 2 on "b"
    f = equivalence.probe(lambda x: 2 * x)
    assert float(f(jnp.array([0.0, np.pi / 4]))) == pytest.approx(1.0)   # sin(0) + sin(pi/2)
    assert equivalence.worst([{equivalence.MESH_COLUMN: "1", "a": 1e-7, "b": 3e-6}]) == 3e-6


def test_count_collectives_in_hlo_text():
    hlo = """
  %cp = f32[2]{0} collective-permute(f32[2]{0} %x), source_target_pairs={{0,1}}
  %cps = (f32[2]{0}, u32[]) collective-permute-start(f32[2]{0} %y)
  %ar = f32[] all-reduce(f32[] %z), to_apply=%add
  %name-with-all-gather = f32[] add(f32[] %a, f32[] %b)
"""
    assert equivalence.count_collectives(hlo) == {
        "collective-permute": 2, "all-gather": 0, "all-reduce": 1, "reduce-scatter": 0,
        "all-to-all": 0}


def test_one_device_conv_equals_the_reference():
    c = equivalence.Comparison(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), (1, 6, 5, 4), None)
    row = c.row((1, 1, 1), 1, unet=False)   # the U-Net parts run in notebook 02's smoke test
    assert set(row) == {equivalence.MESH_COLUMN, "conv", "conv ∂x", "conv ∂w"}
    assert row[equivalence.MESH_COLUMN] == "1·1·1 × 1" and equivalence.worst([row]) < 1e-5
