"""What each ``hrseg`` subcommand does once its arguments are parsed (hrseg/cli.py parses them
and turns errors into one line): each handler calls one public function of the module that
owns the work and prints its result.
"""
from __future__ import annotations

import json
import sys


def _phantom(args) -> int:
    from hrseg.data import phantom
    phantom.write_dataset(args.out, cases=args.cases, seed=args.seed,
                          shape=tuple(args.shape) if args.shape else None, progress=True,
                          task=args.task)
    return 0


def _verify(args) -> int:
    from pathlib import Path

    from hrseg import data
    if not Path(args.dir).is_dir():     # nothing to verify: an error, not a problem list
        what = "not a folder" if Path(args.dir).exists() else "no such folder"
        raise ValueError(f"{args.dir}: {what}")
    problems = data.verify_dataset(args.dir)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"{args.dir}: OK")
    return 0


def _train(args) -> int:
    from hrseg import config, runtime, train
    cfg = config.load(args.file, args.set)
    runtime.start(cfg.runtime, command="hrseg train")
    try:
        result = train.train(cfg, progress=not args.quiet)
    except FloatingPointError as e:  # NaN/Inf: the message names the step and the checkpoint
        print(f"hrseg train: {e}", file=sys.stderr)
        return 1
    print(f"run {result.run_dir}: {result.steps} steps; {train.describe(result)}")
    return 0


def _evaluate(args) -> int:
    from hrseg import runtime, train
    from hrseg.train import evaluation, inference
    runtime.start(command="hrseg evaluate")
    try:
        result = train.evaluate(args.run_dir, step=args.step)
    except evaluation.NotSaved as e:     # computed, then not written: shown all the same
        print(f"{args.run_dir} step {e.result['step']}: {inference.summary_line(e.result)}")
        print(f"hrseg evaluate: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.run_dir} step {result['step']}: {inference.summary_line(result)}")
    return 0


def _predict(args) -> int:
    from hrseg import runtime, train
    runtime.start(command="hrseg predict")
    out = train.predict(args.run_dir, args.volume, args.out,
                        clean_nonfinite=args.clean_nonfinite)
    print(f"prediction written to {out}")
    return 0


def _run(args) -> int:
    from hrseg import runtime
    from hrseg.workbench import pipeline
    runtime.start(command="hrseg run")  # the notebooks' kernels inherit its settings
    extra = json.loads(args.extra) if args.extra else None
    pipeline.run(args.params_dir, only=args.only, out=args.out, progress=not args.quiet,
                 extra=extra, jobs=args.jobs)     # PipelineError: one line (main)
    table = pipeline.results_table(args.out)
    if table is not None:
        print("\n" + table.read_text().strip() + "\n")
        print(f"results table: {table} (also {table.with_suffix('.csv').name}, "
              f"{table.with_suffix('.png').name}; figures in {table.parent}/)")
    else:
        print(f"executed notebooks in {args.out}/ (no results table: run 05_results_table)")
    return 0


def _table(args) -> int:
    from pathlib import Path

    from hrseg.workbench import results
    if not Path(args.runs_dir).is_dir():
        print(f"hrseg table: error: no such folder: {args.runs_dir}", file=sys.stderr)
        return 2
    if args.lesions:
        from hrseg.workbench import lesion_table
        return lesion_table.main(args.runs_dir, last=args.last, rule=args.rule, out=args.out)
    rows = results.collect(args.runs_dir, last=args.last)
    if not rows:
        print(f"hrseg table: error: no run with an evaluation under {args.runs_dir} "
              "(run directories with config.yaml and checkpoints/eval_*.json)", file=sys.stderr)
        return 2
    paths = results.write_table(rows, args.out or f"{args.runs_dir}/results", args.title)
    print(paths["md"].read_text().strip())
    print(f"\nresults table: {paths['md']} (also {paths['csv'].name}, {paths['png'].name})")
    return 0


def _cache(args) -> int:
    from hrseg.data import cache
    entries = cache.scan(args.dir, hash_sources=args.verify)
    bad = [e for e in entries if e.problem is not None]
    for e in entries:
        print(f"{'ok' if e.problem is None else e.problem:<40} {e.size / 2 ** 20:9.2f} MiB  "
              f"{e.stem}")
    total = sum(e.size for e in entries) / 2 ** 20
    if args.prune:
        gone = cache.prune(entries)
        print(f"{args.dir}: {len(entries)} entries ({total:.1f} MiB); removed {len(gone)} "
              f"({sum(e.size for e in gone) / 2 ** 20:.1f} MiB)")
    else:
        print(f"{args.dir}: {len(entries)} entries ({total:.1f} MiB), {len(bad)} stale or "
              f"damaged" + (" (`--prune` removes them)" if bad else ""))
    return 0


def _view(args) -> int:
    import importlib.util

    from hrseg.viz.napari import _view as napari_view
    from hrseg.viz.napari._case import find_case
    find_case(args.path, args.case, args.data)      # a wrong path fails here, before Qt starts
    if importlib.util.find_spec("napari") is None:
        print("hrseg view: error: napari is not installed: pip install -e '.[viewer]'",
              file=sys.stderr)
        return 2
    if not napari_view.has_display():
        print("hrseg view: error: no display (DISPLAY is not set): run it on a desktop, or "
              "headless as `xvfb-run -a hrseg view ... --screenshot out.png`", file=sys.stderr)
        return 2
    return napari_view.view(args.path, case=args.case, data=args.data,
                            screenshot=args.screenshot, widget=not args.no_widget)


def _memory(args) -> int:
    import re

    from hrseg import config, memory, runtime
    runtime.start(command="hrseg memory")
    if args.wang:
        platform = args.platform or "gpu"
        print("Wang et al.'s Table 1 beside hrseg's analytic estimate (wang_baseline rows, "
              f"batch 1, Adam, one device, counted for a {platform.upper()}'s compiler)")
        print(memory.format_comparison(memory.paper_comparison(platform=platform)))
        return 0
    here = memory.platform_of()
    if args.compile != "no" and args.platform not in (None, here):
        raise ValueError(f"--platform {args.platform} --compile: the compile would measure "
                         f"this machine's {here} compiler, not a {args.platform}'s; plan for "
                         f"{args.platform} without --compile, or compile on one")
    if re.fullmatch(r"\s*[0-9.eE+-]+\s*", str(args.budget)):
        raise ValueError(f"--budget {args.budget}: give a unit, e.g. {args.budget}GiB or "
                         f"{args.budget}GB (a bare number would be bytes)")
    budget = config.parse_bytes(args.budget)
    res = args.resolution[0] if len(args.resolution) == 1 else tuple(args.resolution)
    if args.compile == "auto":  # (with "here" a refusal stays one line on stderr)
        print("hrseg memory: confirming the pick by compiling the training step on abstract "
              "inputs (a minute for small models, minutes at 512³; without --compile the "
              "estimate answers alone)", file=sys.stderr, flush=True)
    plan = memory.plan(budget, args.devices, res, batch=args.batch, preset=args.preset,
                       optimizer=args.optimizer, platform=args.platform,
                       compile=None if args.compile == "no" else args.compile)
    print(plan.explain())
    return 0 if plan.mesh is not None else 1


HANDLERS = {"phantom": _phantom, "verify": _verify, "train": _train, "evaluate": _evaluate, "predict": _predict, "run": _run, "table": _table, "cache": _cache, "view": _view, "memory": _memory}
