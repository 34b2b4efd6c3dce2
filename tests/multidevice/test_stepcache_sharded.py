"""stepcache.py on a mesh: the exported halo (shard_map) and gspmd steps equal plain jit."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_step_sharded import TinyNet, ce

from hrseg.parallel import partition
from hrseg.train import step, stepcache


def _steps(train_step, layout, n=2):
    _, state = step.init_state(TinyNet(nnx.Rngs(0)), optax.adam(1e-2))
    state = step.replicate(layout, state)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 16, 8, 1)))
    y = np.asarray(jax.random.randint(jax.random.key(2), (2, 8, 16, 8), 0, 3))
    out = []
    for _ in range(n):
        state, m = train_step(state, *step.place_batch(layout, x, y))
        out.append({k: np.asarray(v) for k, v in m.items()})
    return jax.device_get(state), out


@pytest.mark.parametrize(("backend", "spatial", "data"), [("halo", (2, 2, 1), 2),
                                                          ("gspmd", (1, 2, 2), 2)])
def test_the_exported_sharded_step_is_the_plain_step(backend, spatial, data, tmp_path,
                                                     monkeypatch):
    layout = partition.layout(partition.make_mesh(spatial, data), backend)
    graphdef, _ = step.init_state(TinyNet(nnx.Rngs(0)), optax.adam(1e-2))
    raw = step.make_train_step(graphdef, optax.adam(1e-2), ce, layout, jit=False)
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setattr(stepcache, "_said", set())
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        plain = _steps(jax.jit(raw, donate_argnums=(0,)), layout)
        first, again = stepcache.wrap(raw, {"net": backend}), stepcache.wrap(raw, {"net": backend})
        results = [_steps(first, layout), _steps(again, layout)]
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert list(first.sources.values()) == ["exported"]
    assert list(again.sources.values()) == ["loaded"]
    for state, metrics in results:
        for u, v in zip(jax.tree.leaves(state), jax.tree.leaves(plain[0]), strict=True):
            np.testing.assert_array_equal(u, v)
        for p, q in zip(metrics, plain[1], strict=True):
            assert p.keys() == q.keys()
            for k in p:
                np.testing.assert_array_equal(p[k], q[k])
