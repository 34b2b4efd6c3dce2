"""sliding.py on 8 fake CPU devices: each window runs on the run's mesh (spatially split, and
several windows at once over the data axis) and gives the one-device prediction."""
import numpy as np
import pytest

from hrseg import config, train
from hrseg.parallel import partition
from hrseg.train import inference, sliding


def _predictor(backend, spatial, data):
    cfg = config.load(None, ["data.resolution=[12,16,20]", "data.patch=[8,8,8]",
                             "model.preset=tiny", "model.levels=2", "model.base=4",
                             f"mesh.backend={backend}", f"mesh.spatial={list(spatial)}",
                             f"mesh.data={data}"])
    mesh = partition.layout(partition.make_mesh(cfg.mesh.spatial, cfg.mesh.data), backend)
    graphdef, state, _ = train.build(cfg, mesh)
    return inference.Predictor(cfg, graphdef, mesh), state


@pytest.mark.parametrize("spatial, data", [((2, 2, 2), 1), ((1, 2, 2), 2)])
def test_sliding_window_on_the_mesh_matches_one_device(spatial, data):
    image = np.random.default_rng(0).random((12, 16, 20), np.float32)
    ref, ref_state = _predictor("none", (1, 1, 1), 1)
    pred, state = _predictor("halo", spatial, data)
    assert pred.data == data                                  # windows per forward pass
    want = sliding.sliding_window(lambda w: ref._probs(ref_state, w), image[..., None], (8, 8, 8))
    got = sliding.sliding_window(lambda w: pred._probs(state, w), image[..., None], (8, 8, 8),
                                 batch=pred.data)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    [labels] = pred(state, [image])
    assert labels.shape == (12, 16, 20)
    assert np.mean(labels == np.argmax(want, -1)) > 0.999    # fp32 near-ties may flip

