"""hrseg.runtime.devices: fake CPU devices only without an accelerator (or when forced)."""
import fnmatch
import subprocess
import sys

import pytest

from hrseg.runtime import devices

FLAG = "--xla_force_host_platform_device_count"


def probe(modules=(), nodes=()):
    return {"has_module": lambda m: m in modules,
                "exists": lambda pattern: any(fnmatch.fnmatch(n, pattern) for n in nodes)}


@pytest.mark.parametrize("modules, nodes, env, found", [
    ((), (), {}, []),                                                   # laptop
    (("jax_cuda12_plugin",), ("/dev/nvidia0",), {}, ["gpu"]),           # GPU box
    (("jax_cuda12_plugin",), (), {}, []),                               # plugin, no driver
    ((), ("/dev/nvidia0",), {}, []),                                    # GPU, CPU-only jax
    (("libtpu",), ("/dev/accel0",), {}, ["tpu"]),                       # TPU v4 VM
    (("libtpu",), ("/dev/vfio/0",), {}, ["tpu"]),                       # TPU v5e VM
    (("jax_cuda12_plugin",), ("/dev/nvidia0",), {"JAX_PLATFORMS": "cpu"}, []),  # user: CPU
    (("jax_cuda12_plugin",), ("/dev/nvidia0",), {"JAX_PLATFORMS": "cuda"}, ["gpu"]),
])
def test_accelerators_from_plugins_and_device_nodes(modules, nodes, env, found):
    assert devices.accelerators(env, **probe(modules, nodes)) == found


def test_fake_devices_only_without_an_accelerator():
    env = {"XLA_FLAGS": f"--xla_cpu_foo=1 {FLAG}=4"}
    laptop = devices.choose(64, found=[], environ=env)
    assert (laptop.platform, laptop.fake_devices) == ("cpu", 64)
    assert laptop.env(env) == {"XLA_FLAGS": f"--xla_cpu_foo=1 {FLAG}=64", "JAX_PLATFORMS": "cpu"}
    gpu = devices.choose(64, found=["gpu"], environ=env)
    assert (gpu.platform, gpu.fake_devices) == ("gpu", 0)
    assert gpu.env(env) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # real peaks, no pool
    assert gpu.env({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}) == {}    # the user's choice
    tpu = devices.choose(8, found=["tpu"], environ={})
    assert (tpu.platform, tpu.fake_devices, tpu.env({})) == ("tpu", 0, {})
    assert "not used" in gpu.reason
    forced = devices.choose(8, force_fake=True, found=["tpu"], environ={})
    assert (forced.platform, forced.fake_devices) == ("cpu", 8) and "forced" in forced.reason
    single = devices.choose(0, found=[], environ={})      # notebooks 03-05: no fake devices
    assert single.env({}) == {} and single.platform == "cpu"
    with pytest.raises(ValueError, match="fake_devices"):
        devices.choose(-1, found=[])


def test_setup_writes_the_environment_before_jax_starts(monkeypatch):
    monkeypatch.setattr(devices, "_backends_started", lambda: False)
    env = {}
    choice = devices.setup(8, environ=env) if not devices.accelerators(env) else None
    if choice is None:
        pytest.skip("this machine has an accelerator")
    assert env["XLA_FLAGS"] == f"{FLAG}=8" and env["JAX_PLATFORMS"] == "cpu"


def test_setup_after_jax_started_asks_for_a_kernel_restart():
    import jax
    jax.devices()  # the backends of this test process are started
    env = {}
    if devices.accelerators(env):
        pytest.skip("this machine has an accelerator")
    with pytest.raises(RuntimeError, match="restart the kernel"):
        devices.setup(8, environ=env)
    assert env == {}  # nothing half-applied


def test_setup_in_a_fresh_process_gives_the_fake_devices():
    code = ("import os; os.environ.pop('XLA_FLAGS', None); os.environ.pop('JAX_PLATFORMS', None)\n"
            "from hrseg.runtime import devices\n"
            "c = devices.setup(4)\n"
            "import jax\n"
            "print(c.platform, jax.device_count(), devices.describe(jax.devices()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["cpu", "4"] and "4 cpu devices" in " ".join(out)


class Dev:
    def __init__(self, platform, kind="", stats=None):
        self.platform, self.device_kind, self._stats = platform, kind, stats

    def memory_stats(self):
        return self._stats


def test_describe_and_usable_meshes_on_a_mocked_device_list():
    gpus = [Dev("gpu", "NVIDIA H100 80GB HBM3", {"bytes_limit": 80 * 2 ** 30})] * 8
    assert devices.describe(gpus) == "8 gpu devices (NVIDIA H100 80GB HBM3), 80.0 GiB each"
    assert devices.describe([Dev("cpu", "cpu")]) == "1 cpu device"
    meshes = [[1, 1, 1], [2, 2, 2], [4, 4, 4]]
    assert devices.usable_meshes(meshes, len(gpus)) == [[1, 1, 1], [2, 2, 2]]
    assert devices.usable_meshes(meshes, 64) == meshes
