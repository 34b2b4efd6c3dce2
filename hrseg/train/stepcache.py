"""The traced and lowered training step, kept on disk beside JAX's compilation cache (issue 16).

JAX's persistent cache skips XLA's compile, but a new process still traces the step (Flax
modules, shard_map, the custom VJPs: ~1.3 s at 64³ on this CPU) and lowers it to StableHLO
(~0.4 s) before it can even look the executable up. :func:`wrap` keeps the lowered step as a
``jax.export`` artifact, so a second ``hrseg train``, a resumed run or another notebook with
the same network deserializes it (~0.01 s) and goes straight to the executable cache.

The entry's key is a SHA-256 of everything the traced step depends on: the caller's
fingerprint (the step-relevant parts of the config), the source of the ``hrseg`` package, the
versions of Python, jax, jaxlib, flax and optax, the backend and its devices, ``XLA_FLAGS``,
(the conv kernel, ``model.conv``, is in the config; "auto" resolves by the backend) and the tree structure, shapes,
dtypes and shardings of the arguments. Entries live in ``<compilation cache>/hrseg-steps/``
as ``<key>.exported``: a magic line, a JSON header (its own key, payload size and SHA-256, the
metric names, the number of state leaves) and the serialized artifact, written atomically. An
entry is loaded only if the key in its header is the one asked for: one copied over another
config's key (another learning rate, say) is reported and exported again.

The cache is a shortcut only, never a source of different numbers: the first run exports the
step and then runs the exported step too, so cold and warm runs execute the same module. It is
active when the process was started by ``hrseg.runtime.start`` with a compilation cache and
``runtime.step_cache`` on (``HRSEG_STEP_CACHE=0`` overrides), in a single process. A damaged entry is replaced, an unwritable
folder is reported once and skipped, and a step JAX cannot export (or an entry it cannot call)
runs as plain ``jax.jit`` — one ``hrseg: step cache: ...`` line on stderr for each.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import jax

from hrseg import atomic, runtime
from hrseg.parallel import native

FOLDER = "hrseg-steps"
MAGIC = b"HRSEG-STEP-EXPORT 1\n"
_PACKAGE = Path(__file__).resolve().parents[1]        # hrseg/
_source_hash: list[str] = []
_said: set[str] = set()


def _say(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(f"hrseg: step cache: {line}", file=sys.stderr)


def source_hash() -> str:
    """SHA-256 over the hrseg package's ``.py`` and ``.cc`` files (path and content), once per
    process."""
    if not _source_hash:
        h = hashlib.sha256()
        for path in sorted([*_PACKAGE.rglob("*.py"), *_PACKAGE.rglob("*.cc")]):
            h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
        _source_hash.append(h.hexdigest())
    return _source_hash[0]


def folder() -> Path | None:
    """``<compilation cache>/hrseg-steps``, or None when the step cache is off: the process was
    not started by hrseg.runtime.start, or with ``runtime.step_cache`` off or no compilation
    cache, or it is one of several processes."""
    rt = runtime.current()
    if rt is None or not rt.step_cache or jax.process_count() != 1:
        return None
    return rt.compile_cache / FOLDER


def _environment() -> dict:
    import flax
    import jaxlib
    import optax
    return {"python": sys.version, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "hrseg": source_hash(),
            "backend": jax.default_backend(),
            "devices": [(d.id, d.device_kind) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "x64": bool(jax.config.jax_enable_x64),
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            "native_conv": native.available()}   # its custom calls are in the step or not


def _signature(x) -> list:
    return [list(x.shape), str(x.dtype), str(getattr(x, "sharding", None))]


def key_of(fingerprint, treedef, leaves) -> str:
    """The entry's key: SHA-256 of the fingerprint, the environment and the arguments."""
    blob = json.dumps({"fingerprint": fingerprint, "env": _environment(), "tree": str(treedef),
                       "leaves": [_signature(x) for x in leaves]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_entry(path: Path) -> tuple[dict, bytes] | None:
    """``(header, payload)`` of an intact entry; None if missing; ValueError if damaged."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not raw.startswith(MAGIC):
        raise ValueError(f"{path}: not a step-cache entry")
    end = raw.find(b"\n", len(MAGIC))
    try:
        header = json.loads(raw[len(MAGIC):end])
        payload = raw[end + 1:]
        intact = (len(payload) == header["size"]
                  and hashlib.sha256(payload).hexdigest() == header["sha256"])
    except (ValueError, KeyError, TypeError):
        intact = False
    if end < 0 or not intact:
        raise ValueError(f"{path}: damaged (truncated or changed)")
    return header, payload


def write_entry(path: Path, header: dict, payload: bytes) -> None:
    header = dict(header, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    atomic.write_bytes(path, MAGIC + json.dumps(header).encode() + b"\n" + payload)


class CachedStep:
    """``step(state, *arrays) -> (state, metrics)`` through the step cache (see the module)."""

    def __init__(self, fn: Callable, fingerprint, donate: bool = True):
        self.fn, self.fingerprint, self.donate = fn, fingerprint, donate
        self.plain = jax.jit(fn, donate_argnums=(0,) if donate else ())
        self._calls: dict[str, tuple[Callable, int, list[str]] | None] = {}
        self._keys: dict = {}                 # (folder, tree, leaf signatures) -> key
        self.sources: dict[str, str] = {}     # key -> "exported" | "loaded" | "plain: why"

    def __call__(self, state, *arrays):
        where = folder()
        if where is None:
            return self.plain(state, *arrays)
        leaves, treedef = jax.tree.flatten((state, *arrays))
        sig = (where, treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None))
                                     for x in leaves))
        if sig not in self._keys:     # hashing the environment costs ~10 ms: once per shape
            self._keys[sig] = key_of(self.fingerprint, treedef, leaves)
        key = self._keys[sig]
        if key not in self._calls:
            self._calls[key] = self._prepare(where / f"{key}.exported", key, state, treedef,
                                             leaves)
        entry = self._calls[key]
        if entry is None:
            return self.plain(state, *arrays)
        call, n_state, names = entry
        try:
            out = call(*leaves)
        except Exception as e:   # (a lowering/compile failure: run it plainly)
            if any(getattr(x, "is_deleted", lambda: False)() for x in leaves[:n_state]):
                raise            # it ran and consumed the state: a real failure
            self._off(key, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return self.plain(state, *arrays)
        new = jax.tree.unflatten(jax.tree.structure(state), out[:n_state])
        return new, dict(zip(names, out[n_state:], strict=True))

    def _off(self, key: str, why: str) -> None:
        self._calls[key] = None
        self.sources[key] = f"plain: {why}"
        _say(f"running the step without it ({why})")

    def _caller(self, exported, n_state: int, leaves) -> Callable:
        # the first call's placements, fixed: an uncommitted first state and the committed
        # states after it then share one executable (else the wrapper compiles twice)
        donate = tuple(range(n_state)) if self.donate else ()
        return jax.jit(exported.call, donate_argnums=donate,
                       in_shardings=tuple(x.sharding for x in leaves))

    def _prepare(self, path: Path, key: str, state, treedef, leaves):
        n_state = len(jax.tree.leaves(state))
        try:
            found = read_entry(path)
        except (ValueError, OSError) as e:
            _say(f"{e}; exporting it again")
            found = None
        if found is not None and found[0].get("key") != key:
            # an entry copied over another key: intact, but another step (another lr...)
            _say(f"{path} belongs to another key ({str(found[0].get('key'))[:12]}…, not "
                 f"{key[:12]}…); exporting it again")
            found = None
        if found is not None:
            header, payload = found
            try:
                exported = jax.export.deserialize(bytearray(payload))
                if header.get("state_leaves") != n_state:
                    raise ValueError("a different state")
                self.sources[key] = "loaded"
                return (self._caller(exported, n_state, leaves), n_state,
                        list(header["metrics"]))
            except Exception as e:   # noqa: BLE001  (another jax's artifact: export again)
                _say(f"{path}: unreadable ({type(e).__name__}); exporting it again")
        try:
            exported, names = self._export(state, treedef, leaves)
            payload = bytes(exported.serialize())
        except Exception as e:   # noqa: BLE001  (e.g. a custom call jax.export refuses)
            self._off(key, f"not exportable: {type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:200]}")
            return None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_entry(path, {"key": key, "metrics": names, "state_leaves": n_state}, payload)
        except OSError as e:
            _say(f"cannot write {path} ({e}); the next run exports the step again")
        self.sources[key] = "exported"
        return self._caller(exported, n_state, leaves), n_state, names

    def _export(self, state, in_tree, leaves):
        """``(Exported, metric names)`` of the step over flat leaves: the state's leaves, then
        the arrays' leaves in (``leaves``, of ``in_tree``); the new state's leaves, then the
        metrics by name out."""
        state_tree = jax.tree.structure(state)
        names: list[str] = []

        def flat(*leaves):
            new, metrics = self.fn(*jax.tree.unflatten(in_tree, leaves))
            if jax.tree.structure(new) != state_tree:
                raise ValueError("the step returned a state of another structure")
            if not isinstance(metrics, dict) or any(
                    jax.tree.structure(v).num_leaves != 1 or jax.tree.structure(v).num_nodes != 1
                    for v in metrics.values()):
                raise ValueError("the step's metrics are not a dict of arrays")
            names[:] = sorted(metrics)
            return (*jax.tree.leaves(new), *(metrics[k] for k in names))

        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                 for x in leaves]
        exported = jax.export.export(      # the C++ conv's custom calls (parallel/native.py)
            jax.jit(flat), disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t)
                                            for t in native.TARGETS])(*specs)
        return exported, list(names)


# Config keys that never reach the traced step (names, schedules of the loop, data sources,
# host-side augmentation): runs differing only in these share an entry. Anything not listed
# is part of the key, so a new config key is safe by default.
def config_fingerprint(cfg) -> dict:
    """The parts of a run's Config (hrseg.config) that can shape its training step: every key
    but those tagged ``step=False`` in hrseg/schema.py (a section left empty is dropped)."""
    from hrseg import config
    d = config.to_dict(cfg)
    for key in config.keys(step=False):
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
    return {k: v for k, v in d.items() if v}


def wrap(fn: Callable, fingerprint, donate: bool = True) -> CachedStep:
    """The step ``fn(state, *arrays) -> (state, metrics dict)`` (not jitted), through the step
    cache; ``fingerprint``: JSON-able, everything of the caller's that shapes the traced step."""
    return CachedStep(fn, fingerprint, donate)
