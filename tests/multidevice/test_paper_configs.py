"""params/paper/: the papers' own settings load, and each one's real training step — model,
precision, loss, optimizer and schedule, batch, mesh — is traced and lowered on abstract inputs
(memory.compiled.run_step; nothing allocated), on as many fake CPU devices as its mesh needs,
in one child process. The XLA compile of these paper-scale steps takes minutes each on this
machine (hou_64: 185 s), so it is left to `benchmarks/paper_configs.py`. (In the multi-device
suite only to balance `make test`'s two processes: the child has its own fake devices.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

from hrseg import config

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "params" / "paper").glob("*.yaml"))
NATIVE = (256, 256, 256)   # resample: native — the largest bucket of KiTS19's 45-234 slices

CHILD = r"""
import json, sys
from hrseg import config
from hrseg.memory import compiled
out = {}
for path in sys.argv[1:]:
    cfg = config.load(path)
    shape = NATIVE if cfg.data.resample == "native" else None
    fn, args = compiled.run_step(cfg, shape)
    text = fn.lower(*args).as_text()
    out[path] = {"chars": len(text), "ppermute": text.count("collective_permute")}
print(json.dumps(out))
""".replace("NATIVE", repr(NATIVE))


def test_the_papers_settings_are_all_there():
    names = {p.stem for p in PAPER}
    assert {f"hou_{r}" for r in ("64", "128", "256", "512", "2d")} <= names
    rows = ("baseline", "bottleneck", "sepconv", "ccblock", "abn", "mp")
    assert {f"wang_{s}_{r}" for s in ("96", "256x256x152", "full") for r in rows} <= names
    assert {"wang_fig4b_96", "wang_fig4b_256x256x152"} <= names


def test_hou_configs_are_the_papers_recipe():
    for p in (q for q in PAPER if q.stem.startswith("hou_")):
        cfg = config.load(p)
        t, m = cfg.train, cfg.mesh
        assert (t.loss, t.optimizer, t.lr, t.empty_dice) == ("gdice", "adafactor", 3e-3, 0.0)
        assert m.data == 2 and t.batch == (8 if p.stem == "hou_512" else 16), p.stem
        assert cfg.model.preset in ("paper", "paper2d")


def test_wang_configs_are_the_papers_recipe():
    for p in (q for q in PAPER if q.stem.startswith("wang_")):
        t = config.load(p).train
        assert (t.optimizer, t.lr, t.schedule, t.lr_decay, t.plateau_patience, t.loss,
                t.batch) == ("adam", 4e-4, "plateau", 0.3, 50, "dice_ce_wang", 1), p.stem
    mp = config.load(ROOT / "params" / "paper" / "wang_96_mp.yaml").model
    assert (mp.block, mp.norm, mp.precision) == ("compact", "inplace_abn", "fp16")


def _same_step_but_size(a, b) -> bool:
    """Two configs whose training steps differ only in the input size (and the run's name)."""
    import dataclasses
    ca, cb = config.load(a), config.load(b)
    return (dataclasses.replace(ca.data, resolution=cb.data.resolution, patch=cb.data.patch)
            == cb.data and ca.model == cb.model and ca.mesh == cb.mesh
            and dataclasses.replace(ca.train, name=cb.train.name) == cb.train)


def lowered_configs() -> list[Path]:
    """PAPER less the configs whose step is a lowered one's at another fixed size: Wang's
    256×256×152 rows and Fig. 4b are the 96³ rows at another size (the same code lowers them);
    the native-size rows ("full") are lowered, at their largest bucket."""
    out = []
    for p in PAPER:
        twin = ROOT / "params" / "paper" / (p.stem.replace("256x256x152", "96") + ".yaml")
        if twin != p and twin.is_file() and _same_step_but_size(p, twin):
            continue
        out.append(p)
    return out


def test_the_configs_left_unlowered_differ_from_a_lowered_one_only_in_size():
    lowered = lowered_configs()
    skipped = sorted(set(PAPER) - set(lowered))
    assert {p.stem for p in skipped} == {f"wang_256x256x152_{r}" for r in (
        "baseline", "bottleneck", "sepconv", "ccblock", "abn", "mp")} | {"wang_fig4b_256x256x152"}
    assert all(p.stem.startswith(("hou_", "wang_96_", "wang_full_", "wang_fig4b_96"))
               for p in lowered)


def test_every_paper_config_traces_and_lowers_on_its_mesh():
    paper = lowered_configs()
    need = max(c.mesh.data * c.mesh.spatial[0] * c.mesh.spatial[1] * c.mesh.spatial[2]
               for c in map(config.load, paper))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={need}")
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, paper)], capture_output=True,
                          text=True, env=env, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out) == sorted(map(str, paper))
    for path, lowered in out.items():
        halo = config.load(path).mesh.backend == "halo"
        assert lowered["chars"] > 10_000 and (lowered["ppermute"] > 0) == halo, (path, lowered)
