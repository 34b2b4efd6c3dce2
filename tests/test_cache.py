"""data/cache.py: cache entries verify what they load (issue 31) — a truncated or same-size
corrupted array, or a source replaced with its size and mtime kept, is rebuilt with one line
naming it; `hrseg cache` lists and prunes only its own entries."""
import os
from pathlib import Path

import numpy as np
import pytest

from hrseg import cli, config, data
from hrseg.data import cache, phantom

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "train" / "smoke" / "train_smoke.yaml"


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "ds"
    phantom.write_dataset(root, cases=2, seed=0, shape=(24, 24, 12))
    cfg = config.load(SMOKE, [f"data.root={root}", f"data.cache_dir={tmp_path}/cache"]).data
    return root, cfg, tmp_path / "cache"


def _arrays(ds):
    return {v.id: (np.array(v.image), np.array(v.label)) for v in ds.train + ds.val}


def _one_line(err: str, name: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hrseg: data cache: ") and name in lines[0], err
    return lines[0]


@pytest.mark.parametrize("damage", ["truncate", "same_size", "sidecar"])
def test_a_damaged_entry_is_rebuilt_with_one_line(setup, capsys, damage):
    _root, cfg, where = setup
    fresh = _arrays(data.load_dataset(cfg))
    capsys.readouterr()
    target = min(where.rglob("*.label.npy" if damage == "same_size" else "*.image.npy"))
    if damage == "sidecar":
        target = target.with_name(target.name.replace(".image.npy", ".json"))
        target.write_text('{"cut')
    else:
        raw = bytearray(target.read_bytes())
        if damage == "truncate":
            raw = raw[:len(raw) // 2]
        else:
            raw[-5:] = bytes([2] * 5)            # labels the network would learn from
        target.write_bytes(bytes(raw))
    again = _arrays(data.load_dataset(cfg))
    line = _one_line(capsys.readouterr().err, target.name.split(".")[0])
    assert ("damaged" in line), line
    for k in fresh:
        for a, b in zip(fresh[k], again[k], strict=True):
            np.testing.assert_array_equal(a, b)
    assert cache.problem(Path(str(target).split(".")[0])) is None


def test_a_source_replaced_with_size_and_mtime_kept_is_stale(setup, capsys):
    root, cfg, where = setup
    data.load_dataset(cfg)
    capsys.readouterr()
    src = root / "volume-0.nii.gz"
    st = src.stat()
    raw = bytearray(src.read_bytes())
    raw[4:8] = bytes(4) if raw[4:8] != bytes(4) else b"\x01\x02\x03\x04"   # gzip's MTIME
    src.write_bytes(bytes(raw))                  # other bytes, same size, same mtime
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    data.load_dataset(cfg)
    line = _one_line(capsys.readouterr().err, "0-")
    assert f"stale: its source {src.resolve()} changed; rebuilding it" in line, line
    [side] = [p for p in where.rglob("0-*.json")]
    assert cache.problem(side.with_suffix("")) is None      # rebuilt: the new hash recorded
    data.load_dataset(cfg)
    assert capsys.readouterr().err == ""


def test_hrseg_cache_lists_and_prunes_only_its_own_entries(setup, capsys):
    root, cfg, where = setup
    data.load_dataset(cfg)
    (where / "notes.txt").write_text("mine")
    grid = next(p for p in where.iterdir() if p.is_dir())
    (grid / "README").write_text("mine too")
    assert cli.main(["cache", str(where)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nok ") + out.startswith("ok ") == 2 and "0 stale or damaged" in out, out
    src = root / "volume-1.nii.gz"                    # edited: a new entry, the old one stale
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10 ** 9))
    data.load_dataset(cfg)
    capsys.readouterr()
    assert cli.main(["cache", str(where)]) == 0
    assert "1 stale or damaged" in capsys.readouterr().out
    assert cli.main(["cache", str(where), "--prune"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert (where / "notes.txt").read_text() == "mine" and (grid / "README").is_file()
    assert len(list(grid.glob("*.json"))) == 2
    assert cli.main(["cache", str(where / "missing")]) == 2
    assert capsys.readouterr().err.startswith("hrseg cache: error: ")


def test_an_unwritable_cache_costs_one_line_not_the_run(setup, capsys):
    _root, cfg, where = setup
    where.write_text("a file where the cache folder should be")
    ds = data.load_dataset(cfg)
    assert len(ds.train) + len(ds.val) == 2 and ds.train[0].image.shape == (16, 16, 16)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "cannot write" in err[0] and str(where) in err[0], err
