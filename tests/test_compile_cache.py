"""runtime/compile_cache.py: the persistent cache folder, for this process and its children."""
import os

import jax

from hrseg.runtime import compile_cache

KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")


def test_enable_points_jax_and_the_environment_at_the_project_folder(tmp_path, monkeypatch):
    before = {k: getattr(jax.config, k) for k in KEYS}
    monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
    for k in compile_cache.ENV:
        monkeypatch.delenv(k, raising=False)
    try:
        path = compile_cache.enable(root=tmp_path)
        assert path == (tmp_path / ".cache" / "jax").resolve() and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.3  # CPU steps stored
        # papermill's kernels are children: they read the same settings from the environment
        assert os.environ[compile_cache.ENV_DIR] == str(path)
        assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0.3"
        # a relative folder is under the root; an absolute one is itself
        assert compile_cache.cache_dir("c", tmp_path) == tmp_path / "c"
        assert compile_cache.cache_dir(tmp_path / "elsewhere", "/x") == tmp_path / "elsewhere"
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def test_check_folder_creates_it_private_and_refuses_unsafe_ones(tmp_path):
    """Issue 31: the folder holds executables this process runs: 0700, owned by the user."""
    path = tmp_path / "a" / "jax"
    assert compile_cache.check_folder(path) is None
    assert oct(path.stat().st_mode & 0o777) == "0o700"
    path.chmod(0o777)
    assert "writable by others (mode 0o777)" in compile_cache.check_folder(path)
    path.chmod(0o755)
    assert compile_cache.check_folder(path) is None       # readable by others is fine
    (tmp_path / "file").write_text("x")
    assert "exists and is not a folder" in compile_cache.check_folder(tmp_path / "file")
    assert "cannot create" in compile_cache.check_folder(tmp_path / "file" / "jax")
    if os.getuid() == 0:                                   # root can own it for another user
        os.chown(path, 12345, 12345)
        assert "owned by another user (uid 12345)" in compile_cache.check_folder(path)
