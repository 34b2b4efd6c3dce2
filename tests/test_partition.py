"""partition.py on one device: specs, divisibility errors, mesh errors."""
import typing

import jax
import numpy as np
import pytest

from hrseg.parallel import partition


def test_single_device_mesh_and_specs():
    mesh = partition.make_mesh()
    assert mesh.axis_names == ("data", "x", "y", "z")
    assert partition.spatial_shape(mesh) == (1, 1, 1)
    assert tuple(partition.volume_spec()) == ("data", "x", "y", "z", None)
    assert tuple(partition.label_spec(2)) == ("data", "x", "y")
    arr = partition.shard(mesh, np.zeros((1, 8, 8, 8, 1), np.float32))
    assert arr.shape == (1, 8, 8, 8, 1)


def test_make_mesh_errors_name_the_counts():
    with pytest.raises(ValueError, match=r"2×2×2×2 = 16 devices, but only"):
        partition.make_mesh((2, 2, 2), data=2)
    with pytest.raises(ValueError, match=r"= 2 ≠ 1 devices given"):
        partition.make_mesh((2, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="positive"):
        partition.make_mesh((0, 1, 1))


class FakeMesh:  # check_divisible reads only mesh.shape
    shape: typing.ClassVar[dict] = {"data": 2, "x": 4, "y": 2, "z": 1}


def test_check_divisible_names_axis_size_and_nearest():
    partition.check_divisible((2, 64, 32, 16, 1), FakeMesh, levels=3)
    # an axis that pools evenly but does not split evenly is padded by the step (uneven.py)
    partition.check_divisible((2, 48, 32, 16, 1), FakeMesh, levels=3)
    # an axis has to pool evenly, split or not
    with pytest.raises(ValueError, match=r"axis 3 \(mesh axis 'z'\) has size 17, not a multiple "
                                         r"of 8 \(2\^3 poolings; no mesh can run it"):
        partition.check_divisible((2, 64, 32, 17, 1), FakeMesh, levels=3)
    with pytest.raises(ValueError, match=r"axis 1 \(mesh axis 'x'\) has size 44.*multiple of 8"
                                         r".*nearest sizes that work: 40 or 48"):
        partition.check_divisible((2, 44, 32, 16, 1), FakeMesh, levels=3)
    with pytest.raises(ValueError, match=r"mesh axis 'data'\) has size 3"):
        partition.check_divisible((3, 64, 32, 16, 1), FakeMesh, levels=0)
    with pytest.raises(ValueError, match="expected a volume shape"):
        partition.check_divisible((64, 64), FakeMesh, levels=1)


def test_placement_spec_keeps_uneven_axes_whole():
    spec = partition.placement_spec((2, 48, 30, 16, 1), FakeMesh, partition.volume_spec())
    assert tuple(spec) == ("data", "x", "y", "z", None)    # 48 on 4 devices, 30 on 2: even
    spec = partition.placement_spec((2, 50, 31, 16), FakeMesh, partition.label_spec())
    assert tuple(spec) == ("data", None, None, "z")        # 50 on 4, 31 on 2: kept whole


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend 'mpi' is not one of halo, gspmd, none"):
        partition.layout(partition.make_mesh(), "mpi")
    with pytest.raises(ValueError, match="backend 'mpi'"):
        partition.spmd(lambda x: x, partition.make_mesh(), "mpi", None, None)


def test_layout_decides_the_backend_once():
    mesh = partition.make_mesh()
    none = partition.layout(mesh, "none")
    assert none.mesh.devices.size == 1 and none.data == 1 and none.spatial == (1, 1, 1)
    def fn(x):
        return x + 1

    assert none.spmd(fn, None, None) is fn               # no partitioning: the plain function
    assert partition.layout(mesh, "halo").spmd(fn, (partition.volume_spec(),),
                                               partition.volume_spec()) is not fn
    x = np.ones((1, 4, 4, 4, 1), np.float32)
    assert partition.layout(mesh, "gspmd").constrain(x, partition.volume_spec()) is not x
    assert none.constrain(x, partition.volume_spec()) is x
    assert partition.devices_used((2, 4, 4, 4), "none") == (1, 1, 1, 1)
    assert partition.devices_used((2, 4, 4, 4), "halo") == (2, 4, 4, 4)


def test_axis_names_are_owned_by_partition():
    """The mesh axis names are written out once: no other module spells the tuple again."""
    import re
    from pathlib import Path
    root = Path(partition.__file__).resolve().parents[1]
    spelled = re.compile(r"""\(\s*["'](data|x)["']\s*,\s*["'](x|y)["']""")
    others = [f for sub in ("parallel", "nn", "train", "memory") for f in (root / sub).glob("*.py")
              if f.name != "partition.py" and spelled.search(f.read_text())]
    assert others == []
    assert partition.AXES == (partition.DATA, *partition.SPATIAL) == ("data", "x", "y", "z")
    assert tuple(partition.make_mesh().axis_names) == partition.AXES
