"""Every params/**/*.yaml loads: training configs with hrseg.config (divisible by their mesh,
within the memory per device their header states), notebook runs with their notebook."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from hrseg import config, memory
from hrseg.nn import unet
from hrseg.parallel import partition
from hrseg.train.loop import batch_shape
from hrseg.workbench import pipeline

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "params").rglob("*.yaml"))
NOTEBOOKS = tuple(pipeline.notebook_names())
RUNS = [f for f in FILES if pipeline._notebook_of(f.stem, NOTEBOOKS)]
CONFIGS = [f for f in FILES if not pipeline._notebook_of(f.stem, NOTEBOOKS)]
MEMORY_LINE = re.compile(r"^# memory per device: ([0-9.]+ ?[A-Za-z]+)", re.MULTILINE)


def _rel(f: Path) -> str:
    return str(f.relative_to(ROOT))


def _check_fits_mesh(cfg: config.Config, where: str) -> None:
    m = cfg.mesh
    fake = SimpleNamespace(shape={"data": m.data, "x": m.spatial[0], "y": m.spatial[1],
                                  "z": m.spatial[2]})
    levels = unet.poolings_of(cfg.model)
    try:
        partition.check_divisible(batch_shape(cfg), fake, levels)  # (B, *S, C)
    except ValueError as e:
        pytest.fail(f"{where}: {e}")


def test_params_folders_exist():
    dirs = {_rel(f.parent) for f in RUNS}
    assert {"params/notebooks/default", "params/notebooks/smoke", "params/notebooks/gpu",
            "params/notebooks/gpu/8gpu",
            "params/notebooks/tpu"} <= dirs


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_training_config_loads_and_divides_by_its_mesh(path):
    cfg = config.load(path)
    _check_fits_mesh(cfg, _rel(path))


@pytest.mark.parametrize("path", RUNS, ids=_rel)
def test_notebook_run_has_known_parameters_and_a_loadable_config(path):
    params = pipeline.load_params(path)
    nb = pipeline._notebook_of(path.stem, NOTEBOOKS)
    pipeline.check_params(pipeline.notebooks_dir() / f"{nb}.ipynb", params, path)
    if "config" in params:  # 04_train: the run config it names, with its overrides
        cfg = config.load(ROOT / params["config"], params.get("overrides") or [])
        _check_fits_mesh(cfg, _rel(path))


ACCEL = [f for f in CONFIGS if MEMORY_LINE.search(f.read_text())]


def test_accelerator_configs_state_device_memory_and_time():
    assert len(ACCEL) >= 5, [_rel(f) for f in ACCEL]
    for f in ACCEL:
        text = f.read_text()
        assert "# device:" in text and "# expected time:" in text, _rel(f)


def _platform(path) -> str:
    """The platform a config's '# device:' line names (estimated for its compiler)."""
    device = re.search(r"^# device: (.*)$", path.read_text(), re.MULTILINE).group(1)
    return "tpu" if "TPU" in device and "GPU" not in device else "gpu"


@pytest.mark.parametrize("path", ACCEL, ids=_rel)
def test_accelerator_config_fits_its_stated_memory(path):
    cfg = config.load(path)
    budget = config.parse_bytes(MEMORY_LINE.search(path.read_text()).group(1))
    m = cfg.mesh
    shape = cfg.data.patch or cfg.data.resolution          # what a training step sees
    est = memory.estimate(cfg.model, shape, (m.data, *m.spatial), policy=cfg.model.precision,
                          optimizer=cfg.train.optimizer, batch=cfg.train.batch,
                          in_channels=cfg.in_channels, platform=_platform(path))
    assert est["total"] <= budget, (f"{_rel(path)}: {est['total'] / memory.GiB:.1f} GiB "
                                    f"estimated > {budget / memory.GiB:.1f} GiB stated")


def test_train_128_is_the_64_recipe_at_twice_the_resolution_on_a_2x2x2_mesh():
    """Issue 12 §4: one recipe across the resolution study; only size, levels, mesh differ."""
    import dataclasses
    a, b = config.load(ROOT / "params/train/train_64.yaml"), config.load(ROOT / "params/train/train_128.yaml")
    assert tuple(b.data.resolution) == (128, 128, 128) and tuple(b.mesh.spatial) == (2, 2, 2)
    assert (b.model.levels, b.model.base) == (a.model.levels + 1, a.model.base // 2)
    assert dataclasses.replace(b.data, resolution=a.data.resolution) == a.data
    assert b.augment == a.augment
    assert dataclasses.replace(b.train, name=a.train.name, resume=a.train.resume) == a.train


def test_the_study_is_one_recipe_from_the_paper_config_at_every_resolution():
    """Issue 32: params/study/ is hou_64.yaml's recipe sized for the CPU, the same at 32³, 64³,
    128³ and in 2D; the U-Net follows the paper's schedule (a level in front per doubling, half
    the filters); the ablation differs only in the synthesis."""
    import dataclasses
    study = ROOT / "params" / "study"
    paper = config.load(ROOT / "params/paper/hou_64.yaml")
    c32, c64, c128, c2d, ns = (config.load(study / f"study_{n}.yaml")
                               for n in ("32", "64", "128", "2d", "64_nosynth"))
    for c in (c32, c64, c128, c2d, ns):
        for key in ("optimizer", "lr_decay", "grad_clip", "empty_dice", "schedule"):
            assert getattr(c.train, key) == getattr(paper.train, key), key
        assert c.data.n_val == paper.data.n_val and c.train.steps >= 600
        assert c.train.lr_decay_every < c.train.steps        # decayed within the run
        assert (c.train.steps - c.train.eval_every, c.train.keep_ckpts) == (500, 2)
    same = {"name": "x", "out_dir": "x"}
    for c, levels, base in ((c32, 3, 8), (c128, 5, 2)):
        assert (c.model.levels, c.model.base) == (levels, base)
        assert dataclasses.replace(c.data, resolution=c64.data.resolution) == c64.data
        assert dataclasses.replace(c.model, levels=4, base=4) == c64.model
        assert dataclasses.replace(c.train, **same) == dataclasses.replace(c64.train, **same)
        assert c.augment == c64.augment and c.mesh == c64.mesh
    assert c64.augment.tumour_synthesis_p == paper.augment.tumour_synthesis_p > 0
    assert dataclasses.replace(ns.augment, tumour_synthesis_p=0.5) == c64.augment
    assert ns.augment.tumour_synthesis_p == 0 and ns.train.out_dir != c64.train.out_dir
    assert dataclasses.replace(ns.train, **same) == dataclasses.replace(c64.train, **same)
    assert c2d.model.dims == 2 and c2d.data.slices_2d == 5
    assert dataclasses.replace(c2d.train, batch=1, **same) == dataclasses.replace(c64.train, **same)
