"""hrseg.train.equivalence and viz.halo_blocks on 8 fake CPU devices: the partitioned programs
match one device, and a planted halo bug (no exchange) is caught."""
import jax
import numpy as np
import pytest
from flax import nnx

from hrseg import viz
from hrseg.parallel import halo
from hrseg.train import equivalence


@pytest.fixture(scope="module")
def comparison():
    """The conv comparison only: the U-Net's (tens of seconds of compiling) runs in notebook
    02's smoke test."""
    return equivalence.Comparison(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), (2, 8, 8, 8), None)


@pytest.mark.parametrize("spatial,data", [((2, 2, 1), 1), ((1, 2, 1), 2)])
def test_sharded_conv_equals_one_device(comparison, spatial, data):
    assert equivalence.worst([comparison.row(spatial, data, unet=False)]) < 1e-4


def test_a_conv_without_halos_is_caught(comparison, monkeypatch):
    conv = halo.conv

    def no_halo(x, w, **kw):  # every shard convolved alone: zeros where neighbours' voxels belong
        return conv(x, w, axes=(None, None, None), **kw)

    monkeypatch.setattr(equivalence.halo, "conv", no_halo)
    row = comparison.row((2, 1, 1), 1, unet=False)
    assert row["conv"] > 1e-2 and row["conv ∂x"] > 1e-2


def test_halo_blocks_equal_their_zero_padded_windows():
    vol = np.random.default_rng(0).random((8, 12, 4)).astype(np.float32)
    blocks = viz.halo_blocks(vol, (2, 3), 2)
    expected = viz.padded_windows(vol[:, :, 2], (2, 3), 2)
    assert sorted(blocks) == sorted(expected) and len(blocks) == 6
    for k in blocks:
        np.testing.assert_array_equal(blocks[k], expected[k])
    assert jax.device_count() >= 6
