"""Fixtures shared by the training tests (test_train.py, test_faults.py)."""
import pytest

from hrseg.data import phantom


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny phantom dataset (4 cases of 40×40×24), one per test module: runs write caches
    into it."""
    root = tmp_path_factory.mktemp("phantom")
    phantom.write_dataset(root, cases=4, seed=0, shape=(40, 40, 24))
    return root
