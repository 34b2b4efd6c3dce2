"""Shared by every suite: one JAX compilation cache per test session. Fixtures shared by the
training tests (test_train.py, test_faults.py)."""
import os
import shutil
import tempfile

import pytest

from hrseg import runtime
from hrseg.data import phantom
from hrseg.runtime import compile_cache

# One persistent compilation cache for this pytest process and every process it starts (CLI
# runs, notebook kernels, benchmark workers): a program that one test compiled is loaded, not
# compiled again, by the next test that builds it (a resumed run, the same step in another
# test; tests/test_train.py 229 -> 151 s). A fresh folder each session, so every `make test`
# compiles what CI's clean clone compiles; an explicit $JAX_COMPILATION_CACHE_DIR wins.
_SESSION_CACHE = None
if not os.environ.get(compile_cache.ENV_DIR):
    _SESSION_CACHE = tempfile.mkdtemp(prefix="hrseg-tests-jax-cache-")
    os.environ[compile_cache.ENV_DIR] = _SESSION_CACHE
runtime.start()   # as the entry points do: malloc settings, this compilation cache, step cache


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny phantom dataset (4 cases of 40×40×24), one per test module: runs write caches
    into it."""
    root = tmp_path_factory.mktemp("phantom")
    phantom.write_dataset(root, cases=4, seed=0, shape=(40, 40, 24))
    return root
