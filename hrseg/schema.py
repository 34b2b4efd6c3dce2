"""The run configuration's schema: frozen dataclasses, one section per concern, and the papers'
model presets. Each module reads only its own section: data/ <- DataConfig, augment.py <-
AugmentConfig, nn/unet.py <- ModelConfig, parallel/partition.py <- MeshConfig, train/ <-
TrainConfig, runtime/ <- RuntimeConfig. Each field's roles (may it change on resume, does it
shape the step, does it tell experiments apart) are tagged here once (:func:`role`) and read
with :func:`keys`. Reading YAML, overrides, validation and serialization live in config.py, which
re-exports everything here (``hrseg.config.Config`` etc.).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

RESAMPLE = ("stretch", "spacing", "native")   # data.resample (data/resample.py)
ROLES = ("resume", "step", "recipe")


def role(default, *, resume: bool = False, step: bool = True, recipe: bool = True):
    """A field whose roles differ from a model setting's. Every key has three, read by
    :func:`keys`: ``resume`` — a resumed run may change it (the rest is fixed at the first
    start: train/rundir.py); ``step`` — it shapes the traced train step (the step cache's key:
    train/stepcache.py); ``recipe`` — two runs that differ in it are different experiments,
    not seeds of one (``hrseg table``'s rows: workbench/results.py)."""
    return field(default=default, metadata={"resume": resume, "step": step, "recipe": recipe})


# the roles of keys that do nothing but run the process, log or name the run
_RUN = {"resume": True, "step": False, "recipe": False}


@dataclass(frozen=True)
class DataConfig:
    root: str = role("data/phantom", step=False)  # dataset directory (LiTS or MSD layout)
    layout: str = role("auto", step=False)  # "lits" | "msd" | "kits" | "auto" (detected from the files)
    resolution: tuple[int, ...] = (64, 64, 64)  # network input size R³ (2D: (512, 512))
    resample: str = "stretch"           # "stretch" to the cube (the paper) | "spacing" pad/crop
                                        # | "native": own shape at native_spacing_mm (3D, buckets)
    spacing_mm: float = 0.0             # "spacing": isotropic voxel size (0 = fit the whole volume)
    native_spacing_mm: tuple[float, float, float] = (1.62, 1.62, 3.22)  # "native": voxel size
                                        # x, y, z (Wang et al.'s); resolution is then unused
    buckets_per_octave: int = 3         # "native": padded sizes per doubling (buckets.py)
    antialias: bool = True              # average 2×+ shrinking axes in blocks before trilinear
    hu_window: tuple[float, float] = (-512.0, 512.0)  # HU mapped to [0, 1] (Mesh-TF default)
    preprocess: str = "window"          # "window": hu_window -> [0, 1] | "kits": Wang et al.'s (data/kits.py)
    n_val: int = role(0, step=False)  # validation cases; 0 = the paper's ratio 32/131
    split_seed: int = role(0, step=False)  # seed of the deterministic train/validation split
    slices_2d: int = 5                  # adjacent slices as channels for the 2D network
    cache_dir: str = role("data/cache", **_RUN)  # preprocessed arrays, one file per case and resolution
    max_cases: int = role(0, step=False)  # use only the first N cases (0 = all)
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
        if self.preprocess not in ("window", "kits") or (
                self.preprocess == "kits" and self.resample != "native"):
            raise ValueError(f"config key 'data.preprocess': '{self.preprocess}' must be 'window', "
                             f"or 'kits' with data.resample 'native' (got '{self.resample}')")
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
    """Applied to the batches on the host: nothing here shapes the traced step."""
    tumour_synthesis_p: float = role(0.5, step=False)  # probability of replacing tumours by synthetic ones
    tumour_fraction: tuple[float, float] = role((0.05, 0.25), step=False)  # synthetic tumour share of the liver
    flip: bool = role(True, step=False)  # random flips on each axis
    rotate180: bool = role(True, step=False)  # random 180° in-plane rotation


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "mtf"                 # sets every key below (explicit keys override it); "custom": none
    dims: int = 3                       # 3 = UNet3D, 2 = UNet2D
    levels: int = 4                     # resolution levels (poolings = levels - 1)
    base: int = 32                      # filters at the first level, doubling per level
    convs_per_block: int = 2            # conv layers per encoder/decoder block
    block: str = "plain"                # "plain" | "bottleneck" | "separable" | "compact" (Wang's Compact ConvBlock)
    reduction: int = 4                  # bottleneck factor K of bottleneck/compact blocks (C -> C/K)
    bottleneck_convs: int = 0           # 3³ convs inside a bottleneck/compact block (0 = convs_per_block; 1 = ResNet's 1-3-1)
    downsample: str = "maxpool"         # "maxpool" | "conv" (3³ stride-2 conv unit doubling the channels)
    upsample: str = "transpose"         # "transpose" (k2s2) | "resize_conv" (nearest 2× + 3³ conv unit halving them)
    norm: str = "batch"                 # "batch" | "group" | "instance" | "inplace_abn" | "none"
    norm_groups: int = 8                # groups of group norm
    bn_momentum: float = 0.9            # running-statistics decay (Mesh-TF: 0.9)
    bn_eps: float = 1e-6                # normalization epsilon (Mesh-TF: 1e-6)
    activation: str = "leaky_relu"      # "leaky_relu" (slope 0.1) | "relu" | "elu"
    dropout: float = 0.0                # dropout rate before the head
    head_bias: bool = False             # bias of the 1×1×1 head (Mesh-TF: none)
    classes: int = 3                    # background, liver, tumour
    precision: str = "fp32"             # "fp32" | "bf16" | "fp16"
    conv: str = role("auto", resume=True, recipe=False)  # 3D conv kernel: "auto" (the wide-image
                                        # 2D convs on XLA:CPU, XLA's conv elsewhere) | "xla" | "wide"
                                        # (parallel/cpuconv.py; the sums differ by round-off only)
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
      the same network with Compact ConvBlocks. Their widths are not published; this
      reconstruction is fitted to their Table 1 (9.5 / 3.2 / 2.7 / 2.6 M for baseline,
      +bottleneck, +SepConv, +CCBlock: ``model.block`` plain / bottleneck / separable /
      compact give 8.74 / 3.18 / 2.61 / 2.48 M, each within 10 %; docs/papers-wang.md): 4
      levels of 32–256 filters (256×256×152 pools evenly), two 3³ convs per block, down-
      sampling by a 3³ stride-2 conv doubling the channels and up-sampling by nearest 2× +
      a 3³ conv halving them (Isensee et al.'s modules, whose KiTS recipe Wang follows; the
      blocks never change these), bottleneck = ResNet's 1-3-1 with K = 2.
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
        return dataclasses.replace(mtf, preset=name, convs_per_block=2, head_bias=True,
                                   reduction=2, bottleneck_convs=1, downsample="conv",
                                   upsample="resize_conv")
    if name == "wang_compact":
        return dataclasses.replace(preset("wang_baseline"), preset=name, block="compact")
    raise ValueError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")


@dataclass(frozen=True)
class MeshConfig:
    """How the step is partitioned: it shapes the step, not the result (within round-off)."""
    backend: str = role("halo", recipe=False)  # "halo" (shard_map + ppermute) | "gspmd" | "none"
    spatial: tuple[int, int, int] = role((1, 1, 1), recipe=False)  # devices along x, y, z
    data: int = role(1, recipe=False)   # data-parallel replicas


@dataclass(frozen=True)
class RuntimeConfig:
    """What configures the process (hrseg/runtime/): started by the entry points, overridable
    by environment variables (the table in hrseg/runtime/__init__.py); never fixed by a run."""
    host_malloc: str = role("auto", **_RUN)  # glibc malloc kept for XLA:CPU's scratch: "auto"
                                        # (when JAX runs on the CPU) | "on" | "off" (runtime/hostmem.py)
    compile_cache: str = role(".cache/jax", **_RUN)  # JAX's persistent compilation cache,
                                        # relative to the working folder ("" = off)
    step_cache: bool = role(True, **_RUN)  # keep the traced step beside it (train/stepcache.py)
    distributed: bool = role(False, **_RUN)  # call jax.distributed.initialize() (multi-host)
    coordinator: str = role("", **_RUN)  # host:port of process 0 ("" = from the environment)
    num_processes: int = role(0, **_RUN)  # 0 = from the environment
    process_id: int = role(-1, **_RUN)  # -1 = from the environment

    def __post_init__(self):   # YAML reads a bare on/off as a boolean
        mode = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off",
                "no": "off"}.get(str(self.host_malloc).strip().lower(), str(self.host_malloc))
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"config key 'runtime.host_malloc': '{self.host_malloc}' is not "
                             f"one of auto, on, off")
        object.__setattr__(self, "host_malloc", mode)


@dataclass(frozen=True)
class TrainConfig:
    name: str = role("train", step=False, recipe=False)  # run name: runs/<name>/
    out_dir: str = role("runs", **_RUN)  # parent of run directories
    seed: int = role(0, step=False, recipe=False)  # model init, data order and augmentation seed
    steps: int = role(200, resume=True, step=False)  # optimizer steps
    batch: int = 1                      # global batch (volumes per step)
    optimizer: str = "adafactor"        # "adafactor" (the paper) | "adam"
    lr: float = role(3e-3, resume=True)  # peak learning rate (the paper: 3e-3)
    lr_decay: float = role(0.3, resume=True)  # decay factor of either schedule (Mesh-TF step
                                        # decay; Wang's plateau ×0.3)
    lr_decay_every: int = role(0, resume=True)  # schedule "step": steps between decays (0 = never)
    schedule: str = "step"              # "step" (lr_decay every lr_decay_every steps) | "plateau" (Wang et al.)
    plateau_patience: int = role(50, resume=True)  # schedule "plateau": epochs without a lower
                                        # training loss before a decay
    epoch_steps: int = role(0, resume=True)  # schedule "plateau": steps averaged into one epoch's
                                        # loss (0 = training volumes / batch)
    grad_clip: float = 1.0              # global-norm clipping (0 = off)
    loss: str = "dice_ce"               # "gdice" | "wce" | "dice_ce" (0.2 Dice + 0.8 CE) | "dice_ce_wang" (CE + soft Dice, Isensee's)
    ce_weights: tuple[float, ...] = (1.0, 8.0, 16.0)  # per-class CE weights (released code)
    dice_weight: float = 0.2            # dice_ce: share of the generalized Dice (the rest: CE)
    eval_every: int = role(50, resume=True, step=False)  # steps between validation passes
                                        # (0 = only at the end, -1 = never)
    ckpt_every: int = role(50, resume=True, step=False)  # steps between checkpoints (0 = only at the end)
    keep_ckpts: int = role(3, resume=True, step=False)  # newest checkpoints kept
    resume: bool = role(True, **_RUN)  # continue from the newest checkpoint in the run dir
    empty_dice: float | None = role(1.0, resume=True, step=False)  # Dice of a case whose
                                        # prediction and label are both empty: 1.0 | 0.0 (Hou's
                                        # released code) | null (left out of the mean); recorded
                                        # in every evaluation


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def in_channels(self) -> int:
        """CT channels of the network input: 1 in 3D; the adjacent slices in 2D."""
        return 1 if self.model.dims == 3 else self.data.slices_2d


def keys(**roles: bool) -> tuple[str, ...]:
    """``section.key`` of every Config field whose roles (:func:`role`) match, e.g.
    ``keys(resume=True)``: what a resumed run may change."""
    out = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.type if isinstance(sec.type, type) else
                                    globals()[sec.type]):
            tags = {r: f.metadata.get(r, r != "resume") for r in ROLES}
            if all(tags[r] == v for r, v in roles.items()):
                out.append(f"{sec.name}.{f.name}")
    return tuple(out)
