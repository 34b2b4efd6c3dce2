"""Typed, frozen run configuration: ``load(yaml) -> Config``; an unknown key is an error.

One section per concern. Each module reads only its own section:
data.py <- DataConfig, augment.py <- AugmentConfig, unet.py <- ModelConfig,
partition.py <- MeshConfig, train.py <- TrainConfig.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hrseg import atomic

RESAMPLE = ("stretch", "spacing", "native")   # data.resample (data/resample.py)


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/phantom"          # dataset directory (LiTS or MSD layout)
    layout: str = "auto"                # "lits" | "msd" | "auto" (detected from the files)
    resolution: tuple[int, ...] = (64, 64, 64)  # network input size R³ (2D: (512, 512))
    resample: str = "stretch"           # "stretch" to the cube (the paper) | "spacing" pad/crop
                                        # | "native": own shape at native_spacing_mm (3D, buckets)
    spacing_mm: float = 0.0             # "spacing": isotropic voxel size (0 = fit the whole volume)
    native_spacing_mm: tuple[float, float, float] = (1.62, 1.62, 3.22)  # "native": voxel size
                                        # x, y, z (Wang et al.'s); resolution is then unused
    buckets_per_octave: int = 3         # "native": padded sizes per doubling (buckets.py)
    antialias: bool = True              # average 2×+ shrinking axes in blocks before trilinear
    hu_window: tuple[float, float] = (-512.0, 512.0)  # HU mapped to [0, 1] (Mesh-TF default)
    n_val: int = 0                      # validation cases; 0 = the paper's ratio 32/131
    split_seed: int = 0                 # seed of the deterministic train/validation split
    slices_2d: int = 5                  # adjacent slices as channels for the 2D network
    cache_dir: str = "data/cache"       # preprocessed arrays, one file per case and resolution
    max_cases: int = 0                  # use only the first N cases (0 = all)
    patch: tuple[int, ...] = ()         # training crop [px, py, pz] (empty = the whole volume);
                                        # patch runs predict by sliding window (train/sliding.py)
    patch_foreground: float = 1 / 3     # share of patches centred on a labelled voxel (nnU-Net)

    def __post_init__(self):
        if self.resample not in RESAMPLE:
            raise ValueError(f"config key 'data.resample': '{self.resample}' is not one of "
                             f"{', '.join(RESAMPLE)}")
        if self.resample == "native":
            if len(self.resolution) != 3:
                raise ValueError(f"config key 'data.resample': 'native' is for 3D networks; "
                                 f"data.resolution is {list(self.resolution)}")
            if self.patch:
                raise ValueError("config key 'data.patch': patches are cut from the cube "
                                 "(resample stretch or spacing), not from 'native' volumes")
        if min(self.native_spacing_mm) <= 0:
            raise ValueError(f"config key 'data.native_spacing_mm': sizes must be > 0 mm, "
                             f"got {list(self.native_spacing_mm)}")
        if self.buckets_per_octave < 1:
            raise ValueError(f"config key 'data.buckets_per_octave': must be >= 1, "
                             f"got {self.buckets_per_octave}")
        if self.patch:
            _check_patch(self.patch, self.resolution)
        if not 0.0 <= self.patch_foreground <= 1.0:
            raise ValueError(f"config key 'data.patch_foreground': must be in [0, 1], "
                             f"got {self.patch_foreground}")


def _check_patch(patch: tuple[int, ...], resolution: tuple[int, ...]) -> None:
    """A patch is 3 sizes, each in [1, resolution]; the mesh's divisibility is checked where
    the mesh is known (train/loop.py names this key in that error too)."""
    where = "config key 'data.patch'"
    if len(resolution) != 3:
        raise ValueError(f"{where}: patches are for 3D networks; data.resolution is "
                         f"{list(resolution)}")
    if len(patch) != 3:
        raise ValueError(f"{where}: expected 3 sizes [px, py, pz], got {list(patch)}")
    if any(not 1 <= p <= r for p, r in zip(patch, resolution)):
        raise ValueError(f"{where}: each size must be in [1, data.resolution], got "
                         f"{list(patch)} for resolution {list(resolution)}")


@dataclass(frozen=True)
class AugmentConfig:
    tumour_synthesis_p: float = 0.5     # probability of replacing tumours by synthetic ones
    tumour_fraction: tuple[float, float] = (0.05, 0.25)  # synthetic tumour share of the liver
    flip: bool = True                   # random flips on each axis
    rotate180: bool = True              # random 180° in-plane rotation


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "mtf"                 # sets every key below (explicit keys override it); "custom": none
    dims: int = 3                       # 3 = UNet3D, 2 = UNet2D
    levels: int = 4                     # resolution levels (poolings = levels - 1)
    base: int = 32                      # filters at the first level, doubling per level
    convs_per_block: int = 2            # conv layers per encoder/decoder block
    block: str = "plain"                # "plain" | "bottleneck" | "separable" | "compact" (Wang's Compact ConvBlock)
    reduction: int = 4                  # bottleneck factor K of bottleneck/compact blocks (C -> C/K)
    norm: str = "batch"                 # "batch" | "group" | "instance" | "inplace_abn" | "none"
    norm_groups: int = 8                # groups of group norm
    bn_momentum: float = 0.9            # running-statistics decay (Mesh-TF: 0.9)
    bn_eps: float = 1e-6                # normalization epsilon (Mesh-TF: 1e-6)
    activation: str = "leaky_relu"      # "leaky_relu" (slope 0.1) | "relu" | "elu"
    dropout: float = 0.0                # dropout rate before the head
    head_bias: bool = False             # bias of the 1×1×1 head (Mesh-TF: none)
    classes: int = 3                    # background, liver, tumour
    precision: str = "fp32"             # "fp32" | "bf16" | "fp16"
    gather_below: int = 0               # halo backend: a level whose per-device block on a mesh axis is below this many voxels is all-gathered on that axis (0: never; see parallel/submesh.py)


PRESETS = ("tiny", "mtf", "paper", "paper2d", "wang_baseline", "wang_compact")

# Hou et al. (2019), Sec. 3: at 64³ three blocks of four 3³ convs starting at 256 filters and
# doubling after each pool (levels 256, 512, 1024); each doubling of the resolution puts one
# more block in front with half the filters, so every resolution ends at 1024 filters and a
# similar receptive field in millimetres.  resolution -> (levels, base filters)
PAPER_SCHEDULE = {64: (3, 256), 128: (4, 128), 256: (5, 64), 512: (6, 32)}


def preset(name: str, resolution: int | None = None) -> ModelConfig:
    """The ModelConfig of a named architecture (``resolution`` only for ``"paper"``).

    * ``tiny``   levels 2, base 4: the test variant of every other preset.
    * ``mtf``    tensorflow/mesh ``experimental/unet.py`` flag defaults: ``network_depth 4``
      levels, ``n_base_filters 32`` doubling, ``n_conv_per_block 2``, conv without bias ->
      ``batch_norm(momentum 0.90, epsilon 1e-6)`` -> ``leaky_relu(0.1)``, k2s2 transposed conv
      (``n_base_filters * 2**depth`` filters) then concat, 1×1×1 head without bias. (Its
      ``dropout_keep_p 0.5`` flag is left out: dropout defaults to off here.)
    * ``paper``  Hou et al. 3D schedule (PAPER_SCHEDULE), 4 convs per block, bfloat16 as in
      the released code's ``mtf_dtype`` flag.
    * ``paper2d`` the same architecture as paper(512) in 2D, for 512² slices with the
      adjacent slices as channels (``build(cfg, in_channels=5)``).
    * ``wang_baseline`` / ``wang_compact`` Wang, Oda & Mori (2020): a 3D U-Net baseline and
      the same network with Compact ConvBlocks (their Table 1 reports ~9.5 M and ~2.6 M
      parameters). Their layer widths are not published in what we could read; this is our
      reconstruction: the mtf network with 3 convs per block (8,533,059 parameters) and 4
      levels, so 256×256×152 pools evenly; compact = 1³ reduce by K = 4, three depthwise-
      separable convs, 1³ restore per block (430,235, i.e. 5 % of the baseline, inside the
      issue's ≤ 30 %; hand counts in tests/test_unet.py).
    """
    mtf = ModelConfig(preset="mtf", dims=3, levels=4, base=32, convs_per_block=2,
                      block="plain", norm="batch", bn_momentum=0.9, bn_eps=1e-6,
                      activation="leaky_relu", head_bias=False, classes=3, precision="fp32")
    if name == "mtf":
        return mtf
    if name == "tiny":
        return dataclasses.replace(mtf, preset="tiny", levels=2, base=4)
    if name in ("paper", "paper2d"):
        res = 512 if name == "paper2d" else resolution
        if res not in PAPER_SCHEDULE:
            raise ValueError(f"preset 'paper' needs resolution in {sorted(PAPER_SCHEDULE)}, "
                             f"got {resolution}")
        levels, base = PAPER_SCHEDULE[res]
        return dataclasses.replace(mtf, preset=name, dims=2 if name == "paper2d" else 3,
                                   levels=levels, base=base, convs_per_block=4,
                                   precision="bf16")
    if name == "wang_baseline":
        return dataclasses.replace(mtf, preset=name, convs_per_block=3, head_bias=True)
    if name == "wang_compact":
        return dataclasses.replace(preset("wang_baseline"), preset=name, block="compact",
                                   reduction=4)
    raise ValueError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")


@dataclass(frozen=True)
class MeshConfig:
    backend: str = "halo"               # "halo" (shard_map + ppermute) | "gspmd" | "none"
    spatial: tuple[int, int, int] = (1, 1, 1)  # devices along x, y, z
    data: int = 1                       # data-parallel replicas
    distributed: bool = False           # call jax.distributed.initialize() (multi-host)
    coordinator: str = ""               # host:port of process 0 ("" = from the environment)
    num_processes: int = 0              # 0 = from the environment
    process_id: int = -1                # -1 = from the environment


@dataclass(frozen=True)
class TrainConfig:
    name: str = "train"                 # run name: runs/<name>/
    out_dir: str = "runs"               # parent of run directories
    seed: int = 0                       # model init, data order and augmentation seed
    steps: int = 200                    # optimizer steps
    batch: int = 1                      # global batch (volumes per step)
    optimizer: str = "adafactor"        # "adafactor" (the paper) | "adam"
    lr: float = 3e-3                    # peak learning rate (the paper: 3e-3)
    lr_decay: float = 0.3               # step decay factor (released Mesh-TF code)
    lr_decay_every: int = 0             # steps between decays (0 = never)
    grad_clip: float = 1.0              # global-norm clipping (0 = off)
    loss: str = "dice_ce"               # "gdice" | "wce" | "dice_ce" (0.2 Dice + 0.8 CE)
    ce_weights: tuple[float, ...] = (1.0, 8.0, 16.0)  # per-class CE weights (released code)
    dice_weight: float = 0.2            # dice_ce: share of the generalized Dice (the rest: CE)
    eval_every: int = 50                # steps between validation passes (0 = only at the end, -1 = never)
    ckpt_every: int = 50                # steps between checkpoints (0 = only at the end)
    keep_ckpts: int = 3                 # newest checkpoints kept
    resume: bool = True                 # continue from the newest checkpoint in the run dir
    empty_dice: float = 1.0             # Dice when prediction and label are both empty


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def in_channels(self) -> int:
        """CT channels of the network input: 1 in 3D; the adjacent slices in 2D."""
        return 1 if self.model.dims == 3 else self.data.slices_2d


def _coerce(tp, value, where: str):
    """Convert a YAML value to the field's declared type, or fail naming the key."""
    origin = typing.get_origin(tp)
    try:
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
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set '{item}': the value is not valid YAML") from None
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
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
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


def validate(cfg: Config) -> Config:
    """Range checks of the values (types were checked when the config was built)."""
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


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML run config (missing keys keep their defaults) and apply ``--set`` items.
    An error names where the bad key came from: the file, or ``--set``."""
    raw = {} if path is None else read_mapping(path, "sections")
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
    except (KeyError, ValueError):
        raise ValueError(f"cannot read '{text}' as a size: use e.g. 16GiB, 24GB, 800MiB") from None


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dumps(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump(cfg, path: str | Path) -> None:
    atomic.write_text(path, dumps(cfg))
