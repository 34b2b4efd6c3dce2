"""Typed, frozen run configuration: ``load(yaml) -> Config``; an unknown key is an error.

The schema (the frozen dataclasses, one section per concern, and the model presets) lives in
schema.py and is re-exported here; this module reads YAML and ``--set`` overrides, coerces and
validates them, and writes a Config back (``dumps`` / ``dump``).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml

from hrseg import atomic, yamlsafe
from hrseg.schema import (  # noqa: F401  (re-exported: the schema's public names)
    PAPER_SCHEDULE,
    PRESETS,
    RESAMPLE,
    AugmentConfig,
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    RuntimeConfig,
    TrainConfig,
    keys,
    preset,
)


def _coerce(tp, value, where: str):
    """Convert a YAML value to the field's declared type, or fail naming the key."""
    origin = typing.get_origin(tp)
    try:
        if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
            if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
                return None          # `empty_dice: null`
            [tp] = [a for a in typing.get_args(tp) if a is not type(None)]
            return _coerce(tp, value, where)
        if origin is tuple:
            args = typing.get_args(tp)
            if value is None and args[-1] is Ellipsis:   # `patch: null` = empty
                return ()
            if not isinstance(value, (list, tuple)):
                value = [value] * (3 if args[-1] is not Ellipsis and len(args) == 3 else 1)
            elem = args[0]
            if args[-1] is not Ellipsis and len(args) != len(value):
                raise ValueError(f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(elem, v, where) for v in value)
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(f"not a boolean: {value!r}")
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if value is None or isinstance(value, (dict, list)):
                raise ValueError(f"not a string: {_short(value)}")
            return str(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config key '{where}': {e}") from None
    return value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(  # noqa: TRY004 (a bad config value: one-line error like the others)
            f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
            f"got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(f"unknown config key '{prefix}{key}' "
                             f"(known in {prefix.rstrip('.') or 'top level'}: "
                             f"{', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(tp, value, f"{prefix}{key}")
    return cls(**kwargs)


def _with_preset(raw: dict) -> dict:
    """``raw`` with its model section on top of the named preset's values (explicit keys win)."""
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        return raw  # _build names the bad section
    name = str(model.get("preset", ModelConfig.preset))
    if name == "custom":
        return raw
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    res = data.get("resolution", DataConfig.resolution)
    try:
        base = preset(name, int(max(res if isinstance(res, (list, tuple)) else [res])))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config key 'model.preset': {e}") from None
    return {**raw, "model": {**dataclasses.asdict(base), **model}}


def from_dict(raw: dict) -> Config:
    return _build(Config, _with_preset(raw or {}), "")


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.steps=10", "mesh.spatial=[2,2,2]"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set '{item}': expected key=value, e.g. train.steps=10")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yamlsafe.loads(value, "value")
        except ValueError as e:
            raise ValueError(f"--set '{item[:200]}': {e}") from None
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged.get(k) or {}, v) if isinstance(v, dict) else v
    return merged


def read_mapping(path: str | Path, what: str = "keys") -> dict:
    """A YAML file whose top level is a mapping (empty file: ``{}``); a missing file, bad YAML
    or another top level is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = yamlsafe.read(path) or {}      # size, aliases and depth bounded (hrseg.yamlsafe)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of {what}")  # noqa: TRY004
    return raw


def _keys(raw: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in raw.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


# (key, test, what it must be): checked at load, so a bad value is one line naming its key
# instead of an error deep inside a run.
_RULES = (
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.steps", lambda v: v >= 0, ">= 0"),
    ("train.batch", lambda v: v >= 1, ">= 1"),
    ("train.eval_every", lambda v: v >= -1, ">= -1 (0 = only at the end, -1 = never)"),
    ("train.ckpt_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("train.keep_ckpts", lambda v: v >= 1, ">= 1"),
    ("train.lr_decay_every", lambda v: v >= 0, ">= 0 (0 = never)"),
    ("train.lr_decay", lambda v: v > 0, "> 0"),
    ("train.schedule", lambda v: v in ("step", "plateau"), "step or plateau"),
    ("train.plateau_patience", lambda v: v >= 0, ">= 0"),
    ("train.epoch_steps", lambda v: v >= 0, ">= 0 (0 = training volumes / batch)"),
    ("train.empty_dice", lambda v: v is None or 0 <= v <= 1, "1.0, 0.0 or null"),
    ("train.grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.dice_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("mesh.spatial", lambda v: all(n >= 1 for n in v), "devices >= 1 on every axis"),
    ("mesh.data", lambda v: v >= 1, ">= 1"),
    ("model.levels", lambda v: v >= 1, ">= 1"),
    ("model.base", lambda v: v >= 1, ">= 1"),
    ("model.gather_below", lambda v: v >= 0, ">= 0 (0 = never gather a level)"),
    ("data.resolution", lambda v: all(n >= 1 for n in v), "sizes >= 1"),
    ("data.n_val", lambda v: v >= 0, ">= 0"),
    ("data.max_cases", lambda v: v >= 0, ">= 0"),
)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_NAME = 100


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run folder under ``train.out_dir`` (None: it can)."""
    if not name.strip():
        return "empty"
    if len(name) > MAX_NAME:
        return f"{len(name)} characters, more than {MAX_NAME}"
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("~"):
        return "a plain name: no '/', '..' or '~' (it names a folder under train.out_dir)"
    if any(ord(c) < 32 for c in name):
        return "a plain name without control characters"
    return None


def validate(cfg: Config) -> Config:
    """Range checks of the values (types were checked when the config was built)."""
    why = name_problem(cfg.train.name)
    if why:
        raise ValueError(f"config key 'train.name' must be {why}, got {_short(cfg.train.name)}"
                         if why.startswith("a plain") else
                         f"config key 'train.name' is {why}: give a plain name such as smoke")
    for key, ok, what in _RULES:
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if not ok(value):
            raise ValueError(f"config key '{key}' must be {what}, got {_plain(value)}")
    if len(cfg.data.resolution) != cfg.model.dims:
        raise ValueError(f"config key 'data.resolution' must have {cfg.model.dims} sizes for "
                         f"model.dims={cfg.model.dims}, got {_plain(cfg.data.resolution)}")
    return cfg


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


BASE = "base"   # a run config's key naming the config it extends (relative to its folder)
MAX_BASES = 16


def read_chain(path: str | Path) -> tuple[dict, list[Path]]:
    """A run config with the configs it extends merged under it: ``base: train_2d.yaml`` reads
    that file (relative to this one's folder) first, then this file's keys over it, section by
    section. Returns the merged mapping and the chain of files, the named file first. A
    missing base, a cycle or a chain longer than MAX_BASES is an error naming the chain."""
    chain: list[Path] = []
    layers = []
    path = Path(path)
    while True:
        if path.resolve() in [p.resolve() for p in chain] or len(chain) >= MAX_BASES:
            raise ValueError(f"{_show(chain + [path])}: the '{BASE}' chain "
                             f"{'loops' if len(chain) < MAX_BASES else 'is too long'}")
        try:
            raw = read_mapping(path, "sections")
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{_show(chain)}: {e}" if chain else str(e)) from None
        chain.append(path)
        base = raw.pop(BASE, None)
        layers.append(raw)
        if base is None:
            break
        if not isinstance(base, str) or not base.strip():
            raise ValueError(f"{_show(chain)}: config key '{BASE}' must name a YAML file, "
                             f"got {base!r}")
        path = path.parent / base
    merged: dict = {}
    for raw in reversed(layers):
        merged = _merge(merged, raw)
    return merged, chain


def _show(chain: list[Path]) -> str:
    return " -> ".join(str(p) for p in chain)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML run config (missing keys keep their defaults; ``base:`` names a config it
    extends, see :func:`read_chain`) and apply ``--set`` items. An error names where the bad
    key came from: the file (with the chain of bases), or ``--set``."""
    raw, chain = ({}, []) if path is None else read_chain(path)
    if chain:
        path = _show(chain)
    try:
        over = parse_overrides(overrides)
        from_dict(over)                   # unknown keys / bad types of the overrides alone
    except ValueError as e:
        raise ValueError(f"--set: {str(e).removeprefix('--set ')}") from None
    try:
        from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path or '<defaults>'}: {e}") from None
    try:
        return validate(from_dict(_merge(raw, over)))
    except ValueError as e:
        where = "--set" if any(f"'{k}'" in str(e) for k in _keys(over)) else path or "<defaults>"
        raise ValueError(f"{where}: {e}") from None


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text) -> int:
    """``"16GiB"``, ``"24 GB"``, ``"800MiB"``, ``"1e9"`` -> bytes."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        return int(float(num) * _UNITS[unit])
    except (KeyError, ValueError, OverflowError):   # (1e999GiB: inf; nan)
        raise ValueError(f"cannot read '{text}' as a size: use e.g. 16GiB, 24GB, 800MiB") from None


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dumps(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump(cfg, path: str | Path) -> None:
    atomic.write_text(path, dumps(cfg))
