"""config.py: typed loading, --set overrides, unknown keys named; every params file loads."""
from pathlib import Path

import pytest

from hrseg import config

ROOT = Path(__file__).resolve().parent.parent
PARAMS = sorted((ROOT / "params").glob("**/train*.yaml"))


def test_defaults_are_the_papers_optimizer():
    t = config.Config().train
    assert (t.optimizer, t.lr, t.lr_decay) == ("adafactor", 3e-3, 0.3)


def test_overrides_are_typed():
    cfg = config.load(None, ["train.steps=10", "mesh.spatial=[2,2,1]", "train.lr=1e-2",
                             "data.resolution=[32,32,32]", "runtime.distributed=true"])
    assert cfg.train.steps == 10 and isinstance(cfg.train.steps, int)
    assert cfg.mesh.spatial == (2, 2, 1)
    assert cfg.train.lr == 0.01
    assert cfg.data.resolution == (32, 32, 32)
    assert config.load(None, ["mesh.spatial=2"]).mesh.spatial == (2, 2, 2)   # fills x, y, z
    assert cfg.runtime.distributed is True


@pytest.mark.parametrize("item, where", [("train.stepz=3", "train.stepz"),
                                         ("mesh.spacial=[2,2,2]", "mesh.spacial"),
                                         ("trian.steps=3", "trian")])
def test_unknown_key_is_an_error_naming_it(item, where):
    with pytest.raises(ValueError, match=f"unknown config key '{where}'"):
        config.load(None, [item])


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match="train.steps"):
        config.load(None, ["train.steps=2.5"])
    with pytest.raises(ValueError, match="mesh.spatial"):
        config.load(None, ["mesh.spatial=[2,2]"])
    with pytest.raises(ValueError, match="key=value"):
        config.load(None, ["train.steps"])


def test_yaml_then_overrides_and_dump_roundtrip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\n  name: a\nmesh:\n  spatial: [1, 2, 2]\n")
    cfg = config.load(path, ["train.name=b"])
    assert (cfg.train.steps, cfg.train.name, cfg.mesh.spatial) == (7, "b", (1, 2, 2))
    config.dump(cfg, tmp_path / "out.yaml")
    assert config.load(tmp_path / "out.yaml") == cfg


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(FileNotFoundError):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        config.load(tmp_path / "list.yaml")


def test_params_files_exist_for_the_resolution_study():
    names = {p.name for p in PARAMS}
    for want in ("train_2d.yaml", "train_32.yaml", "train_64.yaml", "train_96.yaml",
                 "train_256.yaml", "train_512.yaml", "train_smoke.yaml"):
        assert want in names, f"params/**/{want} is missing"


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_params_file_loads_and_divides(path):
    from hrseg.nn import unet
    from hrseg.parallel import partition
    cfg = config.load(path)
    assert cfg.model.dims == len(cfg.data.resolution)
    assert cfg.train.batch % cfg.mesh.data == 0
    # a pooling window never straddles two devices: each shard must pool evenly
    shape = (cfg.train.batch, *cfg.data.resolution, 1)
    partition.check_divisible(shape, _FakeMesh(cfg.mesh), unet.poolings_of(cfg.model))


class _FakeMesh:  # check_divisible reads only mesh.shape: no devices needed for a 512³ plan
    def __init__(self, m):
        self.shape = {"data": m.data, "x": m.spatial[0], "y": m.spatial[1], "z": m.spatial[2]}


def test_preset_sets_the_model_and_explicit_keys_override(tmp_path):
    assert config.load(None).model == config.ModelConfig() == config.preset("mtf")  # default
    cfg = config.load(None, ["model.preset=tiny"])
    assert cfg.model == config.preset("tiny")                    # levels 2, base 4
    cfg = config.load(None, ["model.preset=tiny", "model.base=8", "model.norm=inplace_abn"])
    assert (cfg.model.levels, cfg.model.base, cfg.model.norm) == (2, 8, "inplace_abn")
    # "paper" follows the schedule of the run's resolution (Hou et al.: 256³ -> 5 levels, 64)
    cfg = config.load(None, ["model.preset=paper", "data.resolution=[256,256,256]"])
    assert (cfg.model.levels, cfg.model.base, cfg.model.precision) == (5, 64, "bf16")
    assert config.load(ROOT / "params" / "train" / "train_512.yaml").model == config.preset("paper", 512)
    # "custom" takes only the keys given; the dump of a preset run reloads to the same model
    cfg = config.load(None, ["model.preset=custom", "model.levels=3"])
    assert cfg.model.levels == 3 and cfg.model.base == config.ModelConfig.base
    config.dump(config.load(None, ["model.preset=tiny", "model.base=8"]), tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml").model.base == 8
    with pytest.raises(ValueError, match=r"model.preset': unknown preset 'huge'"):
        config.load(None, ["model.preset=huge"])
    with pytest.raises(ValueError, match=r"model.preset': preset 'paper' needs resolution"):
        config.load(None, ["model.preset=paper", "data.resolution=[96,96,96]"])
def test_patch_is_empty_by_default_and_null_means_empty():
    assert config.Config().data.patch == ()
    assert config.load(None, ["data.patch=null"]).data.patch == ()
    cfg = config.load(None, ["data.resolution=[64,64,64]", "data.patch=[32,32,16]"])
    assert cfg.data.patch == (32, 32, 16) and cfg.data.patch_foreground == pytest.approx(1 / 3)


@pytest.mark.parametrize("items, match", [
    (["data.patch=[32,32]"], r"'data.patch': expected 3 sizes"),
    (["data.patch=32"], r"'data.patch': expected 3 sizes"),
    (["data.patch=[32,32,0]"], r"'data.patch': each size must be in \[1, data.resolution\]"),
    (["data.patch=[32,32,128]"], r"'data.patch': each size must be in"),
    (["data.resolution=[64,64]", "model.dims=2", "data.patch=[32,32,32]"],
     r"'data.patch': patches are for 3D networks"),
    (["data.patch_foreground=1.5"], r"'data.patch_foreground': must be in \[0, 1\]"),
])
def test_bad_patches_name_the_key(items, match):
    with pytest.raises(ValueError, match=match):
        config.load(None, items)


def test_a_patch_that_does_not_pool_evenly_names_the_key():
    from hrseg.train import loop
    cfg = config.load(None, ["data.resolution=[64,64,64]", "data.patch=[32,32,20]",
                             "model.levels=4", "mesh.spatial=[1,1,2]"])
    with pytest.raises(ValueError, match=r"'data.patch'.*size 20, not a multiple of 8 \(2\^3 poolings"):
        loop.check_batch_shape(cfg, _FakeMesh(cfg.mesh))
    whole = config.load(None, ["data.resolution=[64,64,36]", "model.levels=4"])
    with pytest.raises(ValueError, match=r"'data.resolution'.*size 36, not a multiple of 8"):
        loop.check_batch_shape(whole, _FakeMesh(whole.mesh))
    loop.check_batch_shape(config.load(None, ["data.resolution=[64,64,36]", "model.levels=4",
                                              "data.patch=[32,32,16]"]), _FakeMesh(whole.mesh))
    batch = config.load(None, ["train.batch=3", "mesh.data=2"])
    with pytest.raises(ValueError, match=r"'train.batch'"):
        loop.check_batch_shape(batch, _FakeMesh(batch.mesh))


def test_the_patch_study_pair_differs_only_in_the_patch():
    import dataclasses
    full = config.load(ROOT / "params" / "train" / "train_64.yaml")
    patch = config.load(ROOT / "params" / "train" / "train_64_patch32.yaml")
    assert patch.data.patch == (32, 32, 32) and not full.data.patch
    data = dataclasses.replace(patch.data, patch=(), patch_foreground=full.data.patch_foreground)
    same = dataclasses.replace(patch, data=data,
                               train=dataclasses.replace(patch.train, name=full.train.name))
    assert same == full


def test_gather_below_is_a_model_key_checked_for_range():
    assert config.load(None).model.gather_below == 0                     # default: never
    assert config.load(None, ["model.gather_below=4"]).model.gather_below == 4
    assert config.load(None, ["model.preset=tiny", "model.gather_below=8"]).model.levels == 2
    with pytest.raises(ValueError, match="model.gather_below"):
        config.load(None, ["model.gather_below=-1"])


def test_a_config_extends_its_base_and_errors_name_the_chain(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("train: {steps: 7, lr: 0.5}\nmodel: {preset: tiny}\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ntrain: {steps: 9}\n")
    cfg = config.load(tmp_path / "sub" / "b.yaml")
    assert (cfg.train.steps, cfg.train.lr, cfg.model.levels) == (9, 0.5, 2)
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\ntrain: {nosuch: 1}\n")
    with pytest.raises(ValueError, match=r"c\.yaml -> .*b\.yaml -> .*a\.yaml: unknown config "
                                         r"key 'train.nosuch'"):
        config.load(tmp_path / "c.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match=r"loop\.yaml -> .*loop\.yaml: the 'base' chain loops"):
        config.load(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.yaml: config file not found: .*missing"):
        config.load(tmp_path / "gone.yaml")


def test_derived_run_configs_say_only_what_differs():
    text = (ROOT / "params" / "train" / "train_2d_16.yaml").read_text()
    assert "base: train_2d.yaml" in text and "optimizer:" not in text
    cfg, base = (config.load(ROOT / "params" / "train" / f) for f in ("train_2d_16.yaml",
                                                                     "train_2d.yaml"))
    assert cfg.train.optimizer == base.train.optimizer and cfg.data.resolution == (16, 16)


def test_wang_recipe_keys_load_and_are_checked():
    """The keys that select Wang et al.'s recipe: plateau schedule, Dice + CE, fp16, rows."""
    cfg = config.load(None, ["model.preset=wang_baseline", "model.block=compact",
                             "model.norm=inplace_abn", "model.precision=fp16",
                             "train.optimizer=adam", "train.lr=4e-4", "train.schedule=plateau",
                             "train.plateau_patience=50", "train.lr_decay=0.3",
                             "train.loss=dice_ce_wang", "data.resolution=[96,96,96]"])
    m, t = cfg.model, cfg.train
    assert (m.downsample, m.upsample, m.reduction, m.bottleneck_convs) == (
        "conv", "resize_conv", 2, 1)
    assert (m.block, m.norm, m.precision) == ("compact", "inplace_abn", "fp16")
    assert (t.schedule, t.plateau_patience, t.epoch_steps, t.loss) == (
        "plateau", 50, 0, "dice_ce_wang")
    assert config.load(None).train.schedule == "step"                    # default unchanged
    for bad, key in [("train.schedule=cosine", "train.schedule"),
                     ("train.plateau_patience=-1", "train.plateau_patience"),
                     ("train.epoch_steps=-2", "train.epoch_steps")]:
        with pytest.raises(ValueError, match=key):
            config.load(None, [bad])


@pytest.mark.parametrize("value, want", [("1.0", 1.0), ("0", 0.0), ("0.0", 0.0),
                                         ("null", None)])
def test_empty_dice_is_a_visible_setting(value, want, tmp_path):
    assert config.load(None).train.empty_dice == 1.0                     # today's default
    cfg = config.load(None, [f"train.empty_dice={value}"])
    assert cfg.train.empty_dice == want and (want is None or isinstance(want, float))
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  empty_dice: {value}\n")
    assert config.load(path).train.empty_dice == want
    for bad in ("2", "-1", "abc"):
        with pytest.raises(ValueError, match="train.empty_dice"):
            config.load(None, [f"train.empty_dice={bad}"])
