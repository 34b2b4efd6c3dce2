"""hrseg.memory.study: the tables of notebooks 01 and 05, with memory.measure replaced by a
fake whose numbers make every column checkable by hand (the real compile runs in notebook 01's
smoke test)."""
import pytest

from hrseg import memory
from hrseg.memory import study
from hrseg.nn import unet

MiB = 2 ** 20


@pytest.fixture
def fake_measure(monkeypatch):
    """Per-device bytes: state (argument + output − alias) 10 MiB, temp 80 MiB / P (halo) or
    160 MiB / P (gspmd); records every call."""
    calls = []

    def measure(cfg, shape, mesh, batch, backend):
        calls.append((shape, mesh, backend))
        p = mesh[0] * mesh[1] * mesh[2]
        temp = (80 if backend == "halo" else 160) * MiB // p
        return {"argument": 8 * MiB, "output": 4 * MiB, "alias": 2 * MiB, "temp": temp,
                "total": 10 * MiB + temp, "compile_s": 0.5}
    monkeypatch.setattr(study, "measure", measure)
    return calls


def test_each_step_is_compiled_once(fake_measure):
    compiled = memory.Compiled("tiny")
    assert compiled(16, [2, 2, 2]) is compiled(16, (2, 2, 2))
    compiled(16, (2, 2, 2), "gspmd")
    assert fake_measure == [((16, 16, 16), (2, 2, 2), "halo"), ((16, 16, 16), (2, 2, 2), "gspmd")]


def test_memory_vs_devices_by_hand(fake_measure):
    rows = memory.memory_vs_devices(memory.Compiled("tiny"), 16, [(1, 1, 1), (2, 2, 2)])
    assert rows[0] == {"devices": 1, "mesh x·y·z": "1·1·1", "halo MiB": 90.0, "gspmd MiB": 90.0,
                       "ideal MiB": 90.0}              # one device: no GSPMD step compiled
    # 8 devices: halo 10 + 80/8 = 20, gspmd 10 + 160/8 = 30, ideal 10 + 80/8 = 20
    assert rows[1] == {"devices": 8, "mesh x·y·z": "2·2·2", "halo MiB": 20.0, "gspmd MiB": 30.0,
                       "ideal MiB": 20.0}
    assert len(fake_measure) == 3


def test_analytic_vs_compiled_divides_by_the_estimate(fake_measure):
    rows = memory.analytic_vs_compiled(memory.Compiled("tiny"), [16], [(1, 1, 1), (2, 1, 1)])
    est = memory.estimate(unet.preset("tiny"), (16, 16, 16), mesh=(2, 1, 1), batch=1)["total"]
    r = rows[1]
    assert (r["resolution"], r["mesh x·y·z"], r["devices"]) == ("16³", "2·1·1", 2)
    assert r["analytic MiB"] == pytest.approx(est / MiB)
    assert r["compiled MiB"] == pytest.approx(50.0)            # 10 + 80 / 2
    assert r["compiled / analytic"] == pytest.approx(50 * MiB / est)


def test_paper_schedule_grows_with_the_resolution():
    rows = memory.paper_schedule([64, 128])
    assert [r["resolution"] for r in rows] == ["64³", "128³"]
    assert [r["voxels"] for r in rows] == [64 ** 3, 128 ** 3]
    assert rows[0]["memory_bytes"] == memory.estimate(unet.preset("paper", 64), (64, 64, 64),
                                                      batch=1)["total"]
    assert rows[1]["memory_bytes"] > 2 * rows[0]["memory_bytes"]   # 8× voxels, half the filters
