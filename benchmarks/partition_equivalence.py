"""The same training run on one device and spatially partitioned, compared, as one JSON object.

    python benchmarks/partition_equivalence.py runs/study/study_128_s0 \
        runs/study_p8/study_128_s0_p8 --json

Issue 32 §1: one 128³ seed repeated on a 2×2×2 halo mesh must give the same Dice as the
single-device run. Both runs share their recipe and seed (only the keys hrseg/schema.py tags
``recipe=False`` — name, output folder, mesh, kernel, runtime — may differ; checked here); the partitioned step sums its losses and gradients in
another order, so the two runs agree to fp32 round-off at first and drift apart slowly, as any
two reductions of a non-convex training do. Reported: the per-step training loss of both
(largest absolute and relative difference over the steps both ran, and at the last one), the
evaluations both made (every Dice of each, the largest absolute difference), and each run's
mean step time (the comparison of the two kernels on this machine).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

DICE = ("tumour_dice_per_case", "tumour_dice_global", "liver_dice_per_case",
        "liver_dice_global")
def _evals(run: Path) -> dict[int, dict]:
    from hrseg.train import rundir
    return {int(p.stem.split("_")[1]): json.loads(p.read_text())
            for p in sorted(rundir.checkpoints(run).glob("eval_*.json"))}


def compare(a: Path, b: Path) -> dict:
    from hrseg import config
    from hrseg.train import rundir
    ca, cb = (config.to_dict(config.load(r / rundir.CONFIG)) for r in (a, b))
    # the same experiment and seed: every key but those schema.py tags recipe=False (name,
    # output folder, mesh, kernel, runtime ...), and train.seed; train.steps may differ (a
    # repeat of the first N steps: the step decay does not depend on it)
    free = (set(config.keys(recipe=False)) - {"train.seed"}) | {"train.steps"}
    flat = [{f"{sec}.{k}": v for sec, d in c.items() if isinstance(d, dict)
             for k, v in d.items() if f"{sec}.{k}" not in free} for c in (ca, cb)]
    differ = sorted(k for k in set(flat[0]) | set(flat[1]) if flat[0].get(k) != flat[1].get(k))
    if differ:
        raise SystemExit(f"partition_equivalence: error: the runs differ in {', '.join(differ)}")
    la = {r["step"]: r for r in rundir.read_metrics(a / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r for r in rundir.read_metrics(b / "metrics.jsonl") if "loss" in r}
    steps = sorted(set(la) & set(lb))
    if not steps:
        raise SystemExit("partition_equivalence: error: no training step in both runs")
    diffs = [(s, abs(la[s]["loss"] - lb[s]["loss"]),
              abs(la[s]["loss"] - lb[s]["loss"]) / max(abs(la[s]["loss"]), 1e-12))
             for s in steps]
    ea, eb = _evals(a), _evals(b)
    evals = []
    for s in sorted(set(ea) & set(eb)):
        ma, mb = ea[s]["metrics"], eb[s]["metrics"]
        evals.append({"step": s, "one_device": {k: ma[k] for k in DICE},
                      "partitioned": {k: mb[k] for k in DICE},
                      "max_abs_dice_diff": max(abs(ma[k] - mb[k]) for k in DICE)})

    def mean_step(log):   # over the steps both ran; the first step compiles
        t = [log[s]["step_time_s"] for s in steps if s > 1]
        return sum(t) / len(t) if t else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "command": " ".join(["python", *sys.argv]),
        "one_device": str(a), "partitioned": str(b),
        "mesh_one_device": ca.get("mesh"), "mesh_partitioned": cb.get("mesh"),
        "steps_compared": [steps[0], steps[-1]],
        "loss_max_abs_diff": max(d[1] for d in diffs),
        "loss_max_rel_diff": max(d[2] for d in diffs),
        "loss_first_step_rel_diff": diffs[0][2],
        "loss_last_step": {"one_device": la[steps[-1]]["loss"],
                           "partitioned": lb[steps[-1]]["loss"]},
        "evaluations": evals,
        "step_time_s": {"one_device": mean_step(la), "partitioned": mean_step(lb)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("one_device", type=Path, help="run directory trained on one device")
    p.add_argument("partitioned", type=Path, help="the same run, spatially partitioned")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    result = compare(args.one_device, args.partitioned)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text if args.json else
          f"loss: max |diff| {result['loss_max_abs_diff']:.3g} over steps "
          f"{result['steps_compared']}; evaluations: "
          + ", ".join(f"step {e['step']} max |Dice diff| {e['max_abs_dice_diff']:.3g}"
                      for e in result["evaluations"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
