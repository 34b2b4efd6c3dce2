"""environment.yml, pyproject.toml and `make install ACCEL=...` cannot drift apart."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11 (environment.yml's)

ROOT = Path(__file__).resolve().parents[1]
# The product's design card: what a user of the workbench gets from one install.
DESIGN_CARD = ("jupyterlab", "jax", "flax", "optax", "nibabel", "matplotlib", "ipywidgets",
               "papermill", "napari")


def _name(req: str) -> str:
    """``"napari[pyqt6]>=0.5"`` -> ``"napari"`` (PEP 503 normalised)."""
    return re.split(r"[\[<>=!~; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _extras(req: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", req)
    return [e.strip() for e in m.group(1).split(",")] if m else []


def reachable(project: dict, extras: list[str]) -> set[str]:
    """Package names ``pip install -e .[extras]`` pulls in directly, following self-extras."""
    name = project["name"]
    opt = project.get("optional-dependencies", {})
    out = {_name(r) for r in project.get("dependencies", [])}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in opt:
            raise KeyError(f"extra '{extra}' is not in pyproject's optional-dependencies")
        for req in opt[extra]:
            if _name(req) == name:
                todo += _extras(req)
            else:
                out.add(_name(req))
    return out


def _env_pip_extras() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    editable = [p for p in pip if p.startswith("-e")]
    assert len(editable) == 1, f"environment.yml must install the project once: {pip}"
    target = editable[0][2:].strip().strip("\"'")
    assert target.startswith(".["), target  # the local project, with extras
    return _extras(target)


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_installs_every_design_card_package(project):
    extras = _env_pip_extras()
    assert extras == ["all"]
    got = reachable(project, extras)
    assert set(DESIGN_CARD) <= got, f"missing from pyproject via .[all]: {set(DESIGN_CARD) - got}"


def test_reachable_notices_a_package_dropped_from_an_extra(project):
    cut = dict(project, **{"optional-dependencies": {
        k: [r for r in v if _name(r) != "napari"]
        for k, v in project["optional-dependencies"].items()}})
    assert "napari" in reachable(project, ["all"])
    assert "napari" not in reachable(cut, ["all"])
    with pytest.raises(KeyError, match="nosuch"):
        reachable(project, ["nosuch"])


def test_accelerator_extras_pin_the_same_jax(project):
    jax_pin = next(r for r in project["dependencies"] if _name(r) == "jax")
    version = jax_pin.split("==")[1]
    opt = project["optional-dependencies"]
    assert opt["cuda"] == [f"jax[cuda12]=={version}"]
    assert opt["tpu"] == [f"jax[tpu]=={version}"]


def test_no_reference_to_files_outside_the_repository():
    assert "DESIGN.md" not in (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize("accel, extras", [(None, "all"), ("cpu", "all"),
                                           ("cuda", "all,cuda"), ("tpu", "all,tpu")])
def test_make_install_accel_picks_the_jax_build(tmp_path, accel, extras):
    cmd = ["make", "-n", "-C", str(ROOT), "install", f"VENV={tmp_path}/venv"]
    out = subprocess.run(cmd + ([f"ACCEL={accel}"] if accel else []), capture_output=True,
                         text=True, check=True).stdout
    assert f'pip install -q -e ".[{extras}]"' in out


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_install_remembers_the_installed_build_and_rejects_unknown(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed-tpu-1").touch()  # a venv installed with ACCEL=tpu
    cmd = ["make", "-n", "-C", str(ROOT), "install", f"VENV={tmp_path}/venv"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert '".[all,tpu]"' in out  # `make test` after `make install ACCEL=tpu` keeps tpu jax
    bad = subprocess.run(cmd + ["ACCEL=rocm"], check=False, capture_output=True, text=True)
    assert bad.returncode != 0 and "ACCEL=rocm: use ACCEL=cpu" in bad.stderr
