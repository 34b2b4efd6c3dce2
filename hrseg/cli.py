"""The ``hrseg`` command: phantom, verify, train, evaluate, predict, run, table, memory, cache,
view.

This module parses the arguments (each subcommand's help with its defaults and an example) and
turns what a handler raises into one ``hrseg <cmd>: error:`` line (exit 2; 1 for a full disk or
a failed notebook) or, for SIGINT/SIGTERM, one line and exit 130/143. The handlers are in
hrseg/commands.py.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from hrseg import commands

DESCRIPTION = ("hrseg: train 3D CT segmentation networks at full resolution, the volume split "
               "over devices (halo exchange), and run the study notebooks.")
EPILOG = """everyday commands:
  hrseg run                                    the study: notebooks 01-05, then the table
  hrseg train -f params/train/train_2d_16.yaml one training run (resumes if stopped)
  hrseg table runs                             the Dice table of the runs in runs/
  hrseg SUBCOMMAND --help                      options and an example of each"""

# Each subcommand's example, shown under its --help.
EXAMPLES = {
    "cache": "hrseg cache data/cache --prune",
    "phantom": "hrseg phantom --cases 4 --shape 128 128 64 --out data/phantom-small",
    "verify": "hrseg verify data/LiTS",
    "train": "hrseg train -f params/train/train_2d_16.yaml --set train.steps=100 train.name=short",
    "evaluate": "hrseg evaluate runs/train_2d_16",
    "predict": "hrseg predict runs/train_2d_16 data/LiTS/volume-130.nii -o seg-130.nii.gz",
    "run": "hrseg run --params-dir params/notebooks/smoke --out /tmp/smoke --only 03 04",
    "table": "hrseg table runs --last 2 --title 'resolution study'",
    "memory": "hrseg memory --resolution 512 --devices 64 --budget 16GiB",
    "view": "hrseg view data/phantom --case 3",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written; each option's default after its help, unless the help states it
    or there is none to state (None, a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (not action.option_strings or d is None or d is False or d is argparse.SUPPRESS
                or d == [] or "default" in text):
            return text
        return f"{text} (default: %(default)s)".strip()


def _sub(sub, name: str, help: str, description: str | None = None):
    """A subcommand whose --help shows its description, option defaults and an example."""
    text = textwrap.fill(description or help[0].upper() + help[1:] + ".", 79)
    return sub.add_parser(name, help=help, description=text,
                          epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrseg", description=textwrap.fill(DESCRIPTION, 79),
                                epilog=EPILOG,
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    s = _sub(sub, "phantom", "write a synthetic abdominal CT dataset (LiTS or KiTS19 layout)",
             "Write a synthetic abdominal CT dataset in the LiTS layout (volume-N.nii.gz, "
             "segmentation-N.nii.gz) or, with --task kits, the KiTS19 layout "
             "(case_XXXXX/imaging.nii.gz, segmentation.nii.gz). By default each case is 512 x 512 x 80-200 slices, "
             "about 0.28 MB a slice on disk: 22 MB (80 slices) to 58 MB (200 slices), so the "
             "default 24 cases take about 0.9 GB; --shape writes smaller cases.")
    s.add_argument("--cases", type=int, default=24, help="number of cases")
    s.add_argument("--out", default="data/phantom", help="folder written, created if missing")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed, the same "
                                                       "dataset")
    s.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="voxels per case, the same anatomy on that grid (default: 512 512 and "
                        "80-200 slices, varying by case)")
    s.add_argument("--task", choices=["lits", "kits"], default="lits",
                   help="lits: liver/tumour, LiTS layout; kits: kidney/tumour, KiTS19 layout")
    s.set_defaults(func=commands.HANDLERS["phantom"])

    s = _sub(sub, "verify", "check a LiTS/MSD/KiTS dataset before training",
             "Check a LiTS/MSD/KiTS19 dataset before training: every volume has its label file, "
             "image and label agree in shape and affine, voxels are finite and labels hold "
             "only 0 (background), 1 (liver or kidney), 2 (tumour). One line per problem; exit 1 if any.")
    s.add_argument("dir", metavar="DIR",
                   help="dataset folder: LiTS (volume-N.nii / segmentation-N.nii), MSD "
                        "(imagesTr/, labelsTr/) or KiTS19 (case_XXXXX/imaging.nii.gz)")
    s.set_defaults(func=commands.HANDLERS["verify"])

    s = _sub(sub, "train", "train (or resume) a run from a YAML config")
    s.add_argument("-f", "--file", help="run config, e.g. params/train/train_64.yaml")
    s.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.steps=10 mesh.spatial=[2,2,2]")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=commands.HANDLERS["train"])

    s = _sub(sub, "evaluate", "Dice of a run's checkpoint on its validation cases")
    s.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run directory of `hrseg train` (<train.out_dir>/<train.name>)")
    s.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    s.set_defaults(func=commands.HANDLERS["evaluate"])

    s = _sub(sub, "predict", "segment a CT volume (NIfTI) with a trained run")
    s.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run directory of `hrseg train`: its newest checkpoint is used")
    s.add_argument("volume", metavar="VOLUME", help="CT volume in HU, .nii or .nii.gz")
    s.add_argument("-o", "--out", help="output NIfTI (default: RUN_DIR/predictions/, named "
                                       "prediction-N for LiTS volume-N)")
    s.add_argument("--clean-nonfinite", action="store_true",
                   help="set NaN/Inf voxels to the HU window's ends instead of refusing")
    s.set_defaults(func=commands.HANDLERS["predict"])

    s = _sub(sub, "run", "execute the notebooks in order with papermill (the study)")
    s.add_argument("--params-dir", default="params/notebooks/default",
                   help="one YAML of notebook parameters per run")
    s.add_argument("--only", nargs="+", metavar="NAME",
                   help="runs or notebooks to execute, e.g. 02 04_train_2d_64 (default: all)")
    s.add_argument("--out", default="runs", help="executed notebooks, figures and tables")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--jobs", type=int, default=1,
                   help="notebooks executed at the same time, each in its own process "
                        "(default 1; the results table waits for the others)")
    s.add_argument("--extra", help=argparse.SUPPRESS)  # JSON parameters for --jobs' children
    s.set_defaults(func=commands.HANDLERS["run"])

    s = _sub(sub, "table", "paper-style Dice table of the runs in a folder")
    s.add_argument("runs_dir", metavar="RUNS_DIR", help="folder of run directories, e.g. runs")
    s.add_argument("--last", type=int, default=3, help="evaluations (checkpoints) per run")
    s.add_argument("--out", help="where results.{md,csv,png} go (default: RUNS_DIR/results)")
    s.add_argument("--title", help="heading of the table")
    s.add_argument("--lesions", action="store_true",
                   help="the per-lesion table instead: detection rate and Dice by lesion "
                        "diameter, false positives per case (lesions.{md,csv,png})")
    s.add_argument("--rule", choices=["overlap", "dice"], default="overlap",
                   help="--lesions: a lesion is detected on any overlap (LiTS, default) or "
                        "when its Dice is >= 0.5")
    s.set_defaults(func=commands.HANDLERS["table"])

    s = _sub(sub, "memory", "plan a mesh + memory techniques for a per-device budget")
    s.add_argument("--resolution", type=int, nargs="+", default=[512],
                   help="cube size (and the paper preset's schedule), or X Y Z")
    s.add_argument("--devices", type=int, default=8, help="devices available")
    s.add_argument("--budget", default="16GiB", help="per device, e.g. 16GiB, 24GB, 800MiB")
    s.add_argument("--batch", type=int, default=1, help="global batch (volumes per step)")
    s.add_argument("--preset", default="paper", help="model preset (paper, mtf, wang_baseline…)")
    s.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adam"],
                   help="optimizer whose state is counted")
    s.add_argument("--compile", nargs="?", const="auto", default="no",
                   choices=["auto", "here", "no"],
                   help="also confirm the pick by compiling the step on abstract inputs "
                        "(XLA's figure; a minute to minutes, nothing allocated): --compile or "
                        "--compile auto = in this process, or in a subprocess with fake CPU "
                        "devices when the mesh needs more devices than it has; here = this "
                        "process only; no = the analytic estimate alone, in seconds")
    s.add_argument("--platform", choices=["cpu", "gpu", "tpu"], default=None,
                   help="the devices planned for: only XLA:CPU widens 16-bit convs to float32, "
                        "so a bf16 step needs more memory on a CPU (default: this machine's "
                        "JAX backend; with --wang: gpu, Wang et al.'s V100)")
    s.add_argument("--wang", action="store_true",
                   help="print Wang et al.'s Table 1 (parameters, GB at 96³, 256×256×152, "
                        "256×256×full) beside our estimate of each row, and exit")
    s.set_defaults(func=commands.HANDLERS["memory"])

    s = _sub(sub, "cache", "list (and prune) a data cache folder (data.cache_dir)")
    s.add_argument("dir", metavar="CACHE_DIR", help="e.g. data/cache")
    s.add_argument("--prune", action="store_true",
                   help="remove entries whose source changed or is gone, damaged ones and "
                        "left-over pieces (only files named like cache entries)")
    s.add_argument("--verify", action="store_true",
                   help="also hash every source file (finds a source replaced with its size "
                        "and mtime kept)")
    s.set_defaults(func=commands.HANDLERS["cache"])

    s = _sub(sub, "view", "open a case (CT, labels, prediction) in napari")
    s.add_argument("path", metavar="CASE_OR_RUN",
                   help="volume-N.nii[.gz], imagesTr/X.nii.gz, a dataset folder, or a run "
                        "folder with predictions/")
    s.add_argument("--case", help="case number or name inside a folder (default: the first)")
    s.add_argument("--data", help="dataset folder of a run's CT volumes (default: data.root "
                                  "from the run's config.yaml)")
    s.add_argument("--screenshot", metavar="PNG",
                   help="save the rendered canvas to PNG and exit instead of opening the GUI")
    s.add_argument("--no-widget", action="store_true", help="without the synthesis dock widget")
    s.set_defaults(func=commands.HANDLERS["view"])
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are one line for the user: bad settings or data, a busy or changed run,
    a damaged checkpoint (a ValueError), a full disk."""
    from hrseg import atomic
    errors: tuple = (ValueError, FileNotFoundError, atomic.DiskFull, FileExistsError,
                     NotADirectoryError, IsADirectoryError, PermissionError)
    if "hrseg.train.rundir" in sys.modules:
        errors += (sys.modules["hrseg.train.rundir"].RunBusy,)
    if "hrseg.workbench.pipeline" in sys.modules:
        errors += (sys.modules["hrseg.workbench.pipeline"].PipelineError,)
    return errors


def _message(e: BaseException) -> str:
    """One line: an OSError of a path as ``<path>: <reason>`` (a file where a folder is
    expected, a folder that cannot be written), anything else as its message."""
    if isinstance(e, OSError) and e.filename and e.strerror and not str(e).startswith("no "):
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split("\n")[:1]) if str(e) else type(e).__name__


def _drop_closed_loop_noise() -> None:
    """After a failed background checkpoint write (a full disk) tensorstore's callbacks can
    reach orbax's closed event loop and print "RuntimeError: Event loop is closed" tracebacks;
    the failure itself is reported as one line, so these are dropped."""
    def noise(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda t, e, tb: None if noise(e) else excepthook(t, e, tb)
    sys.unraisablehook = lambda u: None if noise(u.exc_value) else unraisablehook(u)


INTERRUPTIBLE = ("train", "run", "evaluate", "predict")   # SIGINT/SIGTERM: one line, rc 130/143


def _interrupted(command: str, e: KeyboardInterrupt) -> int:
    import signal

    from hrseg.workbench import interrupt
    sig = signal.SIGTERM if isinstance(e, interrupt.Terminated) else signal.SIGINT
    interrupt.stop_children()
    then = {"train": "the same command resumes from the newest checkpoint",
            "run": "the same command runs the notebooks again (finished runs resume)",
            }.get(command, "nothing was written")
    print(f"hrseg {command}: stopped by {signal.Signals(sig).name}; {then}", file=sys.stderr)
    return 128 + int(sig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "evaluate", "predict"):
        _drop_closed_loop_noise()
    from hrseg.workbench import interrupt
    before = interrupt.catch_signals() if args.command in INTERRUPTIBLE else {}
    try:
        return _run_command(args)
    except KeyboardInterrupt as e:
        if args.command not in INTERRUPTIBLE:
            raise
        return _interrupted(args.command, e)
    finally:
        import signal
        for sig, handler in before.items():    # (cli.main called in-process: put them back)
            signal.signal(sig, handler)


def _run_command(args) -> int:
    """The subcommand; an error the user can fix is one line (and rc 2, 1 for a full disk)."""
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        from hrseg import atomic
        if atomic.is_disk_full(e) and not isinstance(e, atomic.DiskFull):
            e = atomic.DiskFull(atomic.full_file(e) or "?")
        if not isinstance(e, _user_errors()):
            raise
        print(f"hrseg {args.command}: error: {_message(e)}", file=sys.stderr)
        failed_run = type(e).__name__ == "PipelineError"      # a notebook failed: rc 1
        return 1 if isinstance(e, atomic.DiskFull) or failed_run else 2


if __name__ == "__main__":
    sys.exit(main())
