"""train/stepcache.py: the exported step on disk — same numbers, reused, robust to bad entries."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hrseg import config, runtime
from hrseg.nn import losses, unet
from hrseg.parallel import partition
from hrseg.train import step as hstep
from hrseg.train import stepcache

SIZE = 16


@pytest.fixture(scope="module")
def net():
    cfg = unet.preset("tiny")
    opt = optax.adam(1e-3)
    layout = partition.layout(partition.make_mesh((1, 1, 1), 1, devices=jax.devices()[:1]),
                              "none")
    graphdef, state = hstep.init_state(unet.build(cfg), opt)
    loss_fn = lambda logits, labels: losses.weighted_ce(logits, labels, (1.0, 2.0, 4.0))
    raw = hstep.make_train_step(graphdef, opt, loss_fn, layout, jit=False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, SIZE, SIZE, SIZE, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 3, (1, SIZE, SIZE, SIZE)).astype(np.int32))
    return raw, state, x, y


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh compilation-cache folder (the step cache lives inside it)."""
    cfg = runtime.RuntimeConfig(compile_cache=str(tmp_path), step_cache=True)
    monkeypatch.setattr(runtime, "_current",
                        [runtime.Runtime(cfg, False, tmp_path, step_cache=True)])
    monkeypatch.setattr(stepcache, "_said", set())
    yield tmp_path / stepcache.FOLDER


def _copy(state):
    return jax.tree.map(jnp.copy, state)      # the steps donate their state


def _run(step, state, x, y, n=2):
    state, out = _copy(state), []
    for _ in range(n):
        state, m = step(state, x, y)
        out.append({k: np.asarray(v) for k, v in m.items()})
    return state, out


def _same(a, b):
    (sa, ma), (sb, mb) = a, b
    for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for p, q in zip(ma, mb, strict=True):
        assert p.keys() == q.keys()
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])


def test_exported_then_loaded_steps_equal_the_plain_step_bit_for_bit(net, cache):
    raw, state, x, y = net
    plain = _run(jax.jit(raw, donate_argnums=(0,)), state, x, y)
    first = stepcache.wrap(raw, {"net": "tiny"})
    _same(_run(first, state, x, y), plain)
    assert list(first.sources.values()) == ["exported"]
    [entry] = cache.glob("*.exported")
    header, payload = stepcache.read_entry(entry)
    assert header["state_leaves"] == len(jax.tree.leaves(state)) and len(payload) > 1000
    again = stepcache.wrap(raw, {"net": "tiny"})          # a new process would do the same
    _same(_run(again, state, x, y), plain)
    assert list(again.sources.values()) == ["loaded"]
    # another fingerprint, another entry
    other = stepcache.wrap(raw, {"net": "tiny", "lr": 2})
    _run(other, state, x, y, n=1)
    assert list(other.sources.values()) == ["exported"] and len(list(cache.glob("*"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_entry_is_reported_in_one_line_and_replaced(net, cache, capsys, damage):
    raw, state, x, y = net
    plain = _run(jax.jit(raw, donate_argnums=(0,)), state, x, y, n=1)
    stepcache.wrap(raw, {"net": "tiny"})(_copy(state), x, y)
    [entry] = cache.glob("*.exported")
    raw_bytes = entry.read_bytes()
    entry.write_bytes({"truncate": raw_bytes[:len(raw_bytes) // 2],
                       "flip": raw_bytes[:-10] + bytes([raw_bytes[-10] ^ 1]) + raw_bytes[-9:],
                       "garbage": b"not a step\n"}[damage])
    capsys.readouterr()
    fresh = stepcache.wrap(raw, {"net": "tiny"})
    _same(_run(fresh, state, x, y, n=1), plain)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hrseg: step cache: ") and entry.name in err[0]
    assert list(fresh.sources.values()) == ["exported"]
    assert stepcache.read_entry(entry) is not None                 # written again, intact


def test_an_unwritable_folder_is_reported_once_and_the_step_still_runs(net, cache, capsys):
    raw, state, x, y = net
    plain = _run(jax.jit(raw, donate_argnums=(0,)), state, x, y)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the folder should be")
    step = stepcache.wrap(raw, {"net": "tiny"})
    _same(_run(step, state, x, y), plain)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and str(cache) in err[0]


def test_off_without_a_cache_folder_or_when_switched_off(net, cache, monkeypatch):
    raw, state, x, y = net
    rt = runtime.current()
    monkeypatch.setattr(runtime, "_current", [runtime.Runtime(rt.settings, False, rt.compile_cache,
                                                              step_cache=False)])
    step = stepcache.wrap(raw, {"net": "tiny"})
    _run(step, state, x, y, n=1)
    assert step.sources == {} and not cache.exists()
    monkeypatch.setattr(runtime, "_current", [])           # never started: no step cache
    assert stepcache.folder() is None


def test_a_step_jax_cannot_export_runs_plainly_with_one_line(cache, capsys):
    def step(state, x):           # a host callback: jax.export refuses to serialize it
        y = jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return state + 1, {"y": jnp.sum(y)}

    cached = stepcache.wrap(step, {"f": "callback"})
    state, m = cached(jnp.zeros(()), jnp.ones((3,)))
    assert float(state) == 1 and float(m["y"]) == 6
    state, m = cached(state, jnp.ones((3,)))
    assert float(state) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not exportable" in err[0] and not list(cache.glob("*"))


def test_the_fingerprint_keeps_what_shapes_the_step_and_drops_the_rest():
    base = config.Config()
    fp = stepcache.config_fingerprint
    assert fp(base) == fp(config.load(None, ["train.name=other", "train.steps=7",
                                             "train.seed=3", "augment.flip=false",
                                             "data.root=elsewhere"]))
    for change in ("train.lr=0.5", "model.base=8", "train.loss=wce", "mesh.spatial=[2,1,1]",
                   "data.resolution=[32,32,32]"):
        assert fp(base) != fp(config.load(None, [change])), change


def test_an_entry_copied_over_another_key_is_refused_and_exported_again(net, cache, capsys):
    """Issue 31: the SHA-256 proves an entry intact, not whose it is; its header's key does."""
    raw, state, x, y = net
    plain = _run(jax.jit(raw, donate_argnums=(0,)), state, x, y, n=1)
    stepcache.wrap(raw, {"net": "tiny"})(_copy(state), x, y)
    [mine] = cache.glob("*.exported")
    other_step = stepcache.wrap(lambda s, a, b: raw(s, a * 0.5, b), {"net": "tiny", "lr": 0.3})
    other_step(_copy(state), x, y)
    [other] = [p for p in cache.glob("*.exported") if p != mine]
    mine.write_bytes(other.read_bytes())                  # intact, but another step
    capsys.readouterr()
    fresh = stepcache.wrap(raw, {"net": "tiny"})
    _same(_run(fresh, state, x, y, n=1), plain)           # the right step, not the copied one
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another key" in err[0] and mine.name in err[0], err
    assert list(fresh.sources.values()) == ["exported"]
    assert stepcache.read_entry(mine)[0]["key"] == mine.stem
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
