"""train/sliding.py: windows cover every voxel (odd sizes too), the Gaussian map is nnU-Net's,
the weighted average is exact, and a window the size of the volume is whole-volume prediction."""
import itertools
import math

import numpy as np
import pytest

from hrseg import config, train
from hrseg.train import inference, sliding


@pytest.mark.parametrize("size, patch", [(64, 32), (35, 16), (34, 16), (33, 16), (16, 16),
                                         (17, 16), (100, 7)])
def test_starts_run_from_the_first_to_the_last_voxel(size, patch):
    s = sliding.starts(size, patch)
    stride = int(patch * (1 - sliding.OVERLAP))
    assert s[0] == 0 and s[-1] == size - patch
    assert all(0 < b - a <= stride for a, b in itertools.pairwise(s))
    assert len(s) == (1 if size == patch else math.ceil((size - patch) / stride) + 1)


def test_starts_of_a_64_axis_with_32_patches():
    assert sliding.starts(64, 32) == [0, 16, 32]          # overlap 0.5: 3 windows per axis
    assert sliding.starts(35, 16) == [0, 6, 13, 19]       # 19 / 3 = 6.33: spread evenly


def test_gaussian_is_one_at_the_centre_with_sigma_an_eighth():
    w = sliding.gaussian((16, 16, 8))
    assert w.shape == (16, 16, 8) and w.dtype == np.float32 and w.min() > 0
    np.testing.assert_array_equal(w[7:9, 7:9, 3:5], 1.0)   # the 2×2×2 centre of even sizes
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])      # symmetric
    # hand value at the edge of axis 0: centre 7.5, σ = 16/8 = 2; relative to voxel 7 (0.5 off)
    expect = math.exp(-0.5 * (7.5 / 2) ** 2) / math.exp(-0.5 * (0.5 / 2) ** 2)  # 8.8e-4
    assert w[0, 7, 3] == pytest.approx(expect, rel=1e-5)
    odd = sliding.gaussian((9, 9, 9))
    assert odd[4, 4, 4] == 1.0 and odd[0, 4, 4] == pytest.approx(math.exp(-0.5 * (4 / 1.125) ** 2),
                                                                 rel=1e-5)


@pytest.mark.parametrize("shape", [(33, 34, 35), (16, 16, 16), (40, 17, 23), (10, 34, 20)])
def test_windows_cover_every_voxel_and_the_average_is_exact(shape):
    patch = (16, 16, 16)
    rng = np.random.default_rng(0)
    image = rng.random((*shape, 1), np.float32)
    # a "model" that returns its input: a misplaced window or a missing weight shows up here
    out = sliding.sliding_window(lambda w: w, image, patch)
    assert out.shape == (*shape, 1)
    np.testing.assert_allclose(out, image, rtol=1e-6, atol=1e-7)
    # the normalised weight map is 1 everywhere: weights of the windows covering each voxel
    ones = sliding.sliding_window(lambda w: np.ones((*w.shape[:-1], 3), np.float32), image,
                                  patch, batch=3)           # last stack filled up by repeats
    np.testing.assert_allclose(ones, 1.0, rtol=1e-6)
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    count = np.zeros(padded, int)
    for win in sliding.windows(padded, patch):
        count[win] += 1
    assert count.min() >= 1


def test_overlapping_windows_are_weighted_by_the_gaussian():
    # two windows on x (starts 0 and 8 for 24 / 16): window 0 says 0, window 1 says 1; the
    # result is window 1's Gaussian share w1 / (w0 + w1) (hand-computed at x = 12)
    image = np.zeros((24, 16, 16, 1), np.float32)
    calls = iter(range(10))
    out = sliding.sliding_window(lambda w: np.full(w.shape, next(calls), np.float32), image,
                                 (16, 16, 16))
    g = sliding.gaussian((16, 16, 16))[:, 7, 7]
    x = 12                                                  # at offset 12 in w0, 4 in w1
    assert out[x, 7, 7, 0] == pytest.approx(g[4] / (g[12] + g[4]), rel=1e-5)
    assert out[0, 0, 0, 0] == 0.0 and out[23, 0, 0, 0] == 1.0   # covered by one window only


@pytest.fixture(scope="module")
def tiny_model():
    from hrseg.parallel import partition
    cfg = config.load(None, ["data.resolution=[16,16,16]", "model.preset=tiny", "model.levels=2",
                             "model.base=4", "mesh.backend=none"])
    mesh = partition.layout(partition.make_mesh(), cfg.mesh.backend)  # the run's Layout
    graphdef, state, _ = train.build(cfg, mesh)
    return cfg, graphdef, state, mesh


def test_one_window_the_size_of_the_volume_is_whole_volume_prediction(tiny_model):
    import dataclasses
    cfg, graphdef, state, mesh = tiny_model
    vols = list(np.random.default_rng(1).random((2, 16, 16, 16), np.float32))
    whole = inference.Predictor(cfg, graphdef, mesh)
    patched_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                     patch=(16, 16, 16)))
    slid = inference.Predictor(patched_cfg, graphdef, mesh)
    for v in vols:
        x = v[None, ..., None]
        _, want = whole._predict(state.params, state.rest, x)      # (1, 16, 16, 16, K)
        got = sliding.sliding_window(lambda w: slid._probs(state, w), v[..., None], (16, 16, 16))
        np.testing.assert_allclose(got, np.asarray(want)[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(whole(state, vols), slid(state, vols)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int32 and a.shape == (16, 16, 16)


def test_patch_runs_predict_by_sliding_window(tiny_model, monkeypatch):
    import dataclasses
    cfg, graphdef, state, mesh = tiny_model
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=(24, 20, 16),
                                                            patch=(8, 8, 8)))
    seen = []
    real = sliding.sliding_window
    monkeypatch.setattr(sliding, "sliding_window",
                        lambda fn, image, patch, **kw: seen.append(patch) or real(fn, image,
                                                                                  patch, **kw))
    [labels] = inference.Predictor(cfg, graphdef, mesh)(state, [np.zeros((24, 20, 16))])
    assert seen == [(8, 8, 8)] and labels.shape == (24, 20, 16)
