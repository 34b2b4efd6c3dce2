"""hrseg.memory.peak: real allocator peaks where a device keeps statistics, None on CPU."""
import jax

from hrseg.memory import peak
from hrseg.nn import unet


class FakeDevice:
    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_cpu_keeps_no_statistics_so_nothing_is_measured():
    assert jax.devices()[0].platform == "cpu"
    assert peak.peak_bytes_in_use() is None
    assert not peak.measures_peak()
    # would take minutes on CPU if it ran a step: it returns before building anything
    assert peak.train_step_peak_bytes(unet.preset("wang_baseline"), (256, 256, 152)) is None


def test_reads_the_allocator_peak_of_a_device_with_statistics():
    dev = FakeDevice({"bytes_in_use": 10, "peak_bytes_in_use": 12_345, "bytes_limit": 99})
    assert peak.peak_bytes_in_use(dev) == 12_345
    assert peak.measures_peak(dev)
    assert peak.peak_bytes_in_use(FakeDevice({"bytes_in_use": 10})) is None
    assert peak.peak_bytes_in_use(FakeDevice(None)) is None
