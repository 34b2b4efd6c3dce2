"""Multi-device tests: run in their own process with 8 fake CPU devices.

`make test-multidevice` sets XLA_FLAGS before jax is imported. Run alone, this conftest sets it
too; collected after another test already imported jax, the tests are skipped with the reason.
"""
import os
import sys

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(reason=f"needs 8 devices, found {jax.device_count()}: run "
                                   "`make test-multidevice` (its own process, fake CPU devices)")
    for item in items:
        if "multidevice" in str(item.fspath):
            item.add_marker(skip)


SMOKE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "params", "train", "smoke",
                            "train_smoke.yaml")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """4 tiny phantom cases shared by the training tests of this process."""
    from hrseg.data import phantom
    root = tmp_path_factory.mktemp("phantom")
    phantom.write_dataset(root, cases=4, seed=0, shape=(40, 40, 24))
    return root


@pytest.fixture(scope="session")
def losses_of():
    """``losses_of(run_dir)`` -> the training loss of every step in its metrics.jsonl."""
    import json
    from pathlib import Path

    import numpy as np

    def read(run_dir):
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return np.array([r["loss"] for r in map(json.loads, lines) if "loss" in r])
    return read
