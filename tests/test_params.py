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


@pytest.mark.parametrize("path", ACCEL, ids=_rel)
def test_accelerator_config_fits_its_stated_memory(path):
    cfg = config.load(path)
    budget = config.parse_bytes(MEMORY_LINE.search(path.read_text()).group(1))
    m = cfg.mesh
    shape = cfg.data.patch or cfg.data.resolution          # what a training step sees
    est = memory.estimate(cfg.model, shape, (m.data, *m.spatial), policy=cfg.model.precision,
                          optimizer=cfg.train.optimizer, batch=cfg.train.batch,
                          in_channels=cfg.in_channels)
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
