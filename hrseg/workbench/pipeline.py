"""``hrseg run``: execute the study's notebooks in order with papermill.

The notebooks are the numbered ``notebooks/NN_name.ipynb`` files, in number order (adding one
means adding the notebook, its paired text file and its params files; nothing here changes).
A *run* is one YAML in the params directory named after a notebook: ``02_halo_correctness.yaml``
runs ``notebooks/02_halo_correctness.ipynb`` once, ``04_train_32.yaml`` and ``04_train_64.yaml``
run ``04_train`` twice. The YAML's top-level keys are the papermill parameters; the pipeline adds
``out_dir`` (the ``--out`` folder) so every figure and table lands there, next to the executed
notebook ``<out>/<run>.ipynb``. Other YAMLs in the folder (training configs such as
``train_64.yaml``) are not runs: notebooks refer to them by path.

Nothing is skipped silently: a notebook without a params file is an error, and the first failing
notebook stops the pipeline with its cell and error named in one line.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hrseg.config import read_mapping

KERNEL = "python3"  # the Makefile registers the venv's kernel under this name
RESULTS_TABLE = Path("results") / "results.md"  # written by notebook 05 under --out


NOTEBOOKS_ENV = "HRSEG_NOTEBOOKS"  # another folder of numbered notebooks (and --jobs' children)


def notebooks_dir() -> Path:
    """``$HRSEG_NOTEBOOKS`` if set, else ``notebooks/`` of the source tree (hrseg is installed
    editable, `pip install -e .`)."""
    if os.environ.get(NOTEBOOKS_ENV):
        return Path(os.environ[NOTEBOOKS_ENV])
    return Path(__file__).resolve().parents[2] / "notebooks"   # hrseg/workbench/ -> repo


_NUMBERED = re.compile(r"(\d+)_\w+")


def notebook_names(directory: str | Path | None = None) -> tuple[str, ...]:
    """Stems of the numbered notebooks ``NN_name.ipynb`` in ``directory`` (default
    :func:`notebooks_dir`), in number order; other .ipynb files there are not part of the study."""
    directory = Path(directory) if directory is not None else notebooks_dir()
    stems = [p.stem for p in directory.glob("*.ipynb") if _NUMBERED.fullmatch(p.stem)]
    return tuple(sorted(stems, key=lambda s: (int(s.split("_", 1)[0]), s)))


@dataclass(frozen=True)
class NotebookRun:
    name: str          # output stem: <out>/<name>.ipynb
    notebook: str      # one of notebook_names()
    params_file: Path  # its papermill parameters


class PipelineError(RuntimeError):
    """A run failed or cannot start; ``str(e)`` is the one line shown to the user."""


def _notebook_of(stem: str, notebooks: tuple[str, ...]) -> str | None:
    for nb in notebooks:
        if stem == nb or stem.startswith(nb + "_"):
            return nb
    return None


def discover(params_dir: str | Path, only: list[str] | None = None) -> list[NotebookRun]:
    """The runs of a params directory in notebook order (then by file name).

    ``only`` selects runs by run name, notebook name or number prefix (``"02"``, ``"04_train"``,
    ``"04_train_64"``); a selector that matches nothing is an error. Every selected notebook
    must have at least one params file.
    """
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        raise PipelineError(f"params directory not found: {params_dir}")
    notebooks = notebook_names()
    if not notebooks:
        raise PipelineError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir()}")
    runs = []
    for f in sorted(params_dir.glob("*.yaml")):
        nb = _notebook_of(f.stem, notebooks)
        if nb is not None:
            runs.append(NotebookRun(f.stem, nb, f))
    runs.sort(key=lambda r: (notebooks.index(r.notebook), r.name))

    def matches(sel: str, r: NotebookRun) -> bool:
        return sel in (r.name, r.notebook) or (sel.isdigit() and r.notebook.startswith(sel + "_"))

    if only:
        sels = [s.strip() for item in only for s in item.split(",") if s.strip()]
        for s in sels:
            if not any(matches(s, r) for r in runs) and not any(
                    s == nb or (s.isdigit() and nb.startswith(s + "_")) for nb in notebooks):
                raise PipelineError(f"--only {s}: no such notebook or run (notebooks: "
                                    f"{', '.join(notebooks)}; runs in {params_dir}: "
                                    f"{', '.join(r.name for r in runs) or 'none'})")
        wanted_nbs = [nb for nb in notebooks
                      if any(s == nb or (s.isdigit() and nb.startswith(s + "_")) for s in sels)]
        runs = [r for r in runs if any(matches(s, r) for s in sels)]
    else:
        wanted_nbs = list(notebooks)
    missing = [nb for nb in wanted_nbs if not any(r.notebook == nb for r in runs)]
    if missing:
        raise PipelineError(f"no params for notebook(s) {', '.join(missing)} in {params_dir} "
                            f"(expected e.g. {params_dir / (missing[0] + '.yaml')})")
    return runs


def load_params(path: str | Path) -> dict:
    """The papermill parameters of one run: the YAML's top-level mapping."""
    try:
        return read_mapping(path, "notebook parameters")
    except (OSError, ValueError) as e:
        raise PipelineError(str(e)) from None


def check_params(notebook: Path, params: dict, params_file: Path) -> None:
    """A key the notebook's ``parameters`` cell does not define is a typo: refuse it."""
    import papermill as pm
    known = pm.inspect_notebook(str(notebook))
    if not known:
        raise PipelineError(f"{notebook}: no cell tagged 'parameters'")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise PipelineError(f"{params_file}: unknown parameter(s) {', '.join(unknown)} for "
                            f"{notebook.name} (known: {', '.join(known)})")


def _first_line(source: str) -> str:
    for line in (source or "").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()[:80]
    return ""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CELL_LINE = re.compile(r"Cell In ?\[\d*\], line (\d+)")


def describe_failure(run: NotebookRun, output: Path, err: BaseException) -> str:
    """One line: which notebook, which cell, which error, where the executed notebook is."""
    from papermill.exceptions import PapermillExecutionError
    if isinstance(err, PapermillExecutionError):
        evalue = _ANSI.sub("", str(err.evalue)).strip().splitlines()
        evalue = evalue[-1] if evalue else ""
        where, code = "", _first_line(err.source)
        # IPython names the failing line of the cell in the first frame: "Cell In[7], line 3"
        m = _CELL_LINE.search(_ANSI.sub("", "\n".join(err.traceback or [])))
        lines = (err.source or "").splitlines()
        if m and 0 < int(m.group(1)) <= len(lines):
            where, code = f", line {m.group(1)}", lines[int(m.group(1)) - 1].strip()[:80]
        return (f"{run.name} failed in cell In [{err.exec_count}]{where} (`{code}`): "
                f"{err.ename}: {evalue} — see {output}")
    what = _ANSI.sub("", str(err)).strip().splitlines()
    return (f"{run.name} failed: {type(err).__name__}: {what[-1] if what else ''} "
            f"— see {output}")


def execute(run: NotebookRun, out_dir: Path, progress: bool = True, kernel: str = KERNEL,
            extra: dict | None = None, position: str = "") -> Path:
    """Execute one run with papermill into ``<out_dir>/<run.name>.ipynb``; raises PipelineError."""
    import papermill as pm
    source = notebooks_dir() / f"{run.notebook}.ipynb"
    if not source.is_file():
        raise PipelineError(f"{run.name}: notebook not found: {source}")
    params = load_params(run.params_file)
    params["out_dir"] = str(out_dir)
    check_params(source, params, run.params_file)
    known = pm.inspect_notebook(str(source))
    params.update({k: v for k, v in (extra or {}).items() if k in known})
    output = out_dir / f"{run.name}.ipynb"
    bar = {"desc": f"{position}{run.name}", "leave": True, "file": sys.stdout} if progress else False
    try:
        pm.execute_notebook(str(source), str(output), parameters=params, kernel_name=kernel,
                            progress_bar=bar, log_output=False, cwd=str(Path.cwd()),
                            # the kernel's own warnings (e.g. unencrypted local TCP) are noise here
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except KeyboardInterrupt:
        raise
    except Exception as e:  # every failure becomes the one line
        raise PipelineError(describe_failure(run, output, e)) from e
    return output


def run(params_dir: str | Path = "params/notebooks/default", only: list[str] | None = None,
        out: str | Path = "runs", progress: bool = True, kernel: str = KERNEL,
        extra: dict | None = None, jobs: int = 1) -> list[Path]:
    """Execute every run of ``params_dir`` in order; stop at the first failure (PipelineError).

    ``extra``: parameters set after the YAML in every run whose notebook defines them (tests
    use it to redirect data paths). ``jobs`` > 1: that many runs at a time, each in its own
    process (hrseg.workbench.pool).
    Returns the executed notebooks.
    """
    if jobs < 1:
        raise PipelineError(f"--jobs must be >= 1, got {jobs}")
    runs = discover(params_dir, only)
    for r in runs:                  # every params file read before anything is written
        load_params(r.params_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if jobs > 1 and len(runs) > 1:
        from hrseg.workbench import pool
        last = notebook_names()[-1]   # the results table reads every other run: it goes last
        stages = [[r.name for r in runs if r.notebook != last],
                  [r.name for r in runs if r.notebook == last]]
        try:
            pool.run_parallel([s for s in stages if s], params_dir, out, jobs, progress, extra,
                              env={NOTEBOOKS_ENV: str(notebooks_dir())})
        except pool.RunFailed as e:
            raise PipelineError(str(e)) from None
        done = [out / f"{r.name}.ipynb" for r in runs]
    else:
        done = [execute(r, out, progress, kernel, extra, position=f"[{i}/{len(runs)}] ")
                for i, r in enumerate(runs, 1)]
    if progress:
        print(f"{len(done)} notebook(s) executed in {time.perf_counter() - t0:.0f} s -> {out}/")
    return done


def notebook_setup(devices: int | None = None, fake_devices: bool = False) -> Path:
    """The first code cell of every notebook; returns the working directory.

    Moves into the folder that holds ``params/`` when the kernel started one level below it
    (JupyterLab starts kernels in ``notebooks/``; papermill runs from the repository root), so
    paths in params files resolve alike. With ``devices`` (notebooks that compile meshes), uses
    the GPUs/TPUs that exist, or — only without one, or with ``fake_devices`` — asks XLA for that
    many fake CPU devices (hrseg.runtime.devices): call it before jax is imported (each notebook
    is its own kernel). Then starts the runtime (hrseg.runtime.start: malloc settings, the
    compilation and step caches under the repository's ``.cache/jax``).
    """
    from hrseg import runtime
    if not Path("params").is_dir() and Path("../params").is_dir():
        os.chdir("..")
    if devices:
        from hrseg.runtime import devices as hrseg_devices
        print(hrseg_devices.setup(devices, force_fake=fake_devices).reason)
    runtime.start(command="hrseg notebook")
    return Path.cwd()


def ensure_phantom(root: str | Path, cases: int, seed: int = 0, shape=None,
                   progress: bool = True) -> str:
    """Make sure ``root`` holds a dataset before a notebook reads it; returns what was done.

    A missing or empty folder gets the phantom asked for (hrseg.data.phantom.write_dataset); a
    folder holding that same phantom is used (completed if an earlier write was interrupted).
    A folder holding a phantom of other cases, seed or shape is an error naming both (never
    silently another dataset); a folder of real data (LiTS or MSD, no ``phantom.json``) is used
    as it is and never written to. Concurrent callers (notebooks run side by side) are
    serialised by a lock file next to ``root``.
    """
    import fcntl
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # `hrseg run --jobs 2` may start two notebooks that both want it: one writes, the other
    # waits on the lock and then finds it written
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_phantom(root, cases, seed, shape, progress)


def _ensure_phantom(root: Path, cases: int, seed: int, shape, progress: bool) -> str:
    from hrseg.data import phantom
    if root.is_dir() and any(root.iterdir()) and phantom.read_manifest(root) is None:
        return f"{root}: using the dataset there (not a phantom: left untouched)"
    want = phantom.request(cases, seed, shape)
    up_to_date, _ = phantom.check_folder(root, want)       # PhantomMismatch names both
    if up_to_date:
        return f"{root}: using the phantom there ({phantom.describe(want)})"
    phantom.write_dataset(root, cases=cases, seed=seed,
                          shape=tuple(shape) if shape else None, progress=progress)
    return f"{root}: phantom written, {cases} cases, seed {seed}, shape {shape or 'full size'}"


def results_table(out: str | Path = "runs") -> Path | None:
    """The markdown results table notebook 05 wrote under ``out``, if any."""
    path = Path(out) / RESULTS_TABLE
    return path if path.is_file() else None
