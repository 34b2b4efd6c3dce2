"""Training: the loop around step.py's jitted train step — data, checkpoints, evaluation.

``train(cfg) -> RunResult`` writes ``runs/<name>/``: ``config.yaml``, ``metrics.jsonl`` (one
line per step: loss, grad norm, training Dice, learning rate, wall time, voxels/s; one line per
evaluation; tblog.py writes the same to TensorBoard event files beside it), ``checkpoints/``
(orbax + ``eval_<step>.json``) and ``result.json``.

Everything a step consumes is a function of ``(seed, step)``: the batch (data.batch_for_step),
the augmentation key of each case (``fold_in(fold_in(key(seed), step), row)``), and the state
restored from a checkpoint. So a run killed at any moment and resumed from its newest
checkpoint ends with bit-identical parameters on CPU, and a 2-host run sees the same batches as
a 1-host run.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hrseg import atomic, config
from hrseg.config import Config
from hrseg.metrics import region_dice, shown
from hrseg.nn import losses, precision, unet
from hrseg.parallel import partition
from hrseg.runtime import multihost
from hrseg.train import (
    checkpoint,
    distributed,
    inference,
    rundir,
    step,
    stepcache,
    tblog,
)
from hrseg.train.batches import Batches, batch_shape, check_batch_shape  # noqa: F401  (loop API)
from hrseg.train.optim import epoch_steps, learning_rate, make_optimizer, make_schedule


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    steps: int                      # optimizer steps taken (total, across resumes)
    resumed_from: int | None        # checkpoint step this invocation started from
    final_loss: float | None        # training loss of the last step run here
    eval: dict | None               # the last evaluation (see inference.Evaluator)
    step_time_s: float | None       # median wall time per step, compile excluded
    compile_s: float | None         # wall time of the first step of this invocation
    voxels_per_s: float | None      # training voxels per second at the median step time
    devices: int = 1                # devices of the mesh (all processes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


def build(cfg: Config, layout: partition.Layout, steps_per_epoch: int = 1):
    """``(graphdef, state on the layout's mesh, optimizer)`` of a config, freshly initialised
    (``steps_per_epoch``: the plateau schedule's epoch; the state's structure ignores it)."""
    model = unet.build(cfg.model, cfg.in_channels, rngs=nnx.Rngs(cfg.train.seed))
    optimizer = make_optimizer(cfg.train, steps_per_epoch)
    loss_scaling = precision.policy(cfg.model.precision).loss_scaling
    graphdef, state = step.init_state(model, optimizer, loss_scaling)
    return graphdef, step.replicate(layout, state), optimizer


def make_layout(cfg: Config) -> partition.Layout:
    """The run's mesh and backend, decided once (the first devices of the host)."""
    return partition.layout(partition.make_mesh(cfg.mesh.spatial, cfg.mesh.data),
                            cfg.mesh.backend)


def _finite_or_raise(metrics: dict, step_no: int, ckpts: checkpoint.Checkpoints) -> None:
    """Stop unless the step was good: a finite loss, gradients and new state (params, batch
    statistics, optimizer state: step.py's one ``finite`` reduction)."""
    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(gnorm) and bool(metrics["finite"]):
        return
    ckpts.wait()  # the last good checkpoint must be complete before we stop
    what = (f"the loss is {loss}" if not math.isfinite(loss) else
            f"the gradient norm is {gnorm}" if not math.isfinite(gnorm) else
            "the new state (weights, batch-norm statistics or optimizer state) is not finite")
    last = ckpts.latest()
    keep = (f"the last good checkpoint is step {last} in {ckpts.directory}" if last is not None
            else "no checkpoint was written yet")
    raise FloatingPointError(f"step {step_no}: {what}; training stopped, {keep} "
                             f"(lower train.lr, or check the input data of this step)")


def overflow_skipped(policy: precision.Policy, metrics: dict) -> bool:
    """An fp16 step whose scaled gradients overflowed (the loss itself finite): the step
    skipped its update and halved the loss scale, and training goes on. A non-finite loss, or
    an overflow at a scale below step.MIN_SCALE, is no scaling matter: the NaN guard stops the
    run as it does without fp16."""
    return bool(policy.loss_scaling and not metrics["finite"]
                and math.isfinite(float(metrics["loss"]))
                and float(metrics["loss_scale"]) >= step.MIN_SCALE)


def _say(line: str) -> None:
    print(f"hrseg: {line}", file=sys.stderr)


def _start(cfg: Config, ckpts: checkpoint.Checkpoints, state):
    """``(state, resumed_from)``: the newest intact checkpoint (damaged newer ones are set
    aside with one line), or the fresh state."""
    found = ckpts.restore_intact(state, warn=_say)
    if found is None:
        return state, None
    restored, step_no = found
    for s in ckpts.steps():
        if s > step_no:          # damaged: training writes these steps again
            ckpts.discard(s)
    return restored, step_no


def train(cfg: Config, *, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train (or resume) the run of ``cfg``; ``on_step(step, record)`` after each step.

    Everything that can fail on bad settings or data (the mesh, the model, the dataset) is
    checked before the run directory is created, so a failed start leaves nothing behind.
    """
    multihost.initialize(cfg.runtime)
    main = distributed.is_main()
    run_dir = rundir.path_of(cfg)
    if main and not rundir.is_run(run_dir):
        rundir.restore_config(run_dir)             # checkpoints without config.yaml
    if main and rundir.is_run(run_dir):
        rundir.check_resume(run_dir, cfg)          # before any work: a changed run is refused
    layout = make_layout(cfg)
    check_batch_shape(cfg, layout.mesh)
    batches = Batches(cfg, layout)
    graphdef, state, optimizer = build(cfg, layout,
                                       epoch_steps(cfg.train, len(batches.ds.train)))
    evaluator = inference.Evaluator(cfg, graphdef, layout, batches.ds.val)

    lock = rundir.Lock(run_dir).acquire() if main else None
    try:
        return _train(cfg, run_dir, layout, graphdef, state, optimizer, batches, evaluator,
                      progress, on_step)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, run_dir, layout, graphdef, state, optimizer, batches, evaluator, progress,
           on_step) -> RunResult:
    t = cfg.train
    main = distributed.is_main()
    ckpts = checkpoint.Checkpoints(rundir.checkpoints(run_dir), keep=t.keep_ckpts)
    try:
        if ckpts.latest() is not None and not t.resume:
            raise ValueError(f"{run_dir} already has checkpoints (newest: step "
                             f"{ckpts.latest()}); set train.resume=true to continue it, or "
                             f"choose another train.name")
        state, resumed_from = _start(cfg, ckpts, state)
        start = int(state.step)
        if main:
            rundir.record_start(run_dir, cfg, start)
        distributed.barrier("config")
        result = _loop(cfg, run_dir, layout, graphdef, state, optimizer, batches, evaluator,
                       ckpts, start, progress, on_step)
        ckpts.wait()
        ckpts.prune()            # orbax calls are collective: every process makes them
    finally:
        ckpts.close()
    result.resumed_from = resumed_from
    result.devices = int(layout.mesh.devices.size)
    if main:
        atomic.write_json(run_dir / rundir.RESULT, result.to_dict())
    return result


def _loop(cfg, run_dir, layout, graphdef, state, optimizer, batches, evaluator, ckpts, start,
          progress, on_step) -> RunResult:
    t = cfg.train
    main = distributed.is_main()
    loss_fn = losses.get(t.loss, t.ce_weights, t.dice_weight)
    policy = precision.policy(cfg.model.precision)
    train_step = stepcache.wrap(   # traced once per machine and network, then from disk
        step.make_train_step(graphdef, optimizer, loss_fn, layout, cfg.model.dims,
                             policy.loss_scaling, jit=False),
        {**stepcache.config_fingerprint(cfg),   # the plateau's epoch is traced into the step
         "epoch_steps": epoch_steps(t, len(batches.ds.train))})
    log = rundir.MetricsLog(run_dir / rundir.METRICS, start, main)
    tb = tblog.TensorBoard(run_dir, start, main)       # the same records, for TensorBoard
    schedule, plateau = make_schedule(t), t.schedule == "plateau"

    def evaluate_and_log(n):
        result = evaluator(state, n, on_predictions=lambda c, p: tb.predictions(n, c, p))
        tb.evaluation(n, result)
        if main:
            atomic.write_json(ckpts.eval_path(n), {"step": n, "config": config.to_dict(cfg),
                                                   "metrics": result})
            log.write({"step": n, "eval": result})
            bar.write(f"step {n}: {inference.summary_line(result)}")
        return result

    bar = tqdm(total=t.steps, initial=min(start, t.steps), disable=not (progress and main),
               desc=t.name, dynamic_ncols=True)
    times, sizes, last_loss, last_eval, compile_s = [], [], None, None, None
    try:
        for s in range(start, t.steps):
            t_data = time.perf_counter()
            images, labels = batches(s)
            voxels = math.prod(images.shape[:-1])      # native sizes: this step's bucket
            t0 = time.perf_counter()
            state, metrics = train_step(state, images, labels)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            if compile_s is None:
                compile_s = dt
            else:
                times.append(dt)
                sizes.append(voxels)
            n = s + 1
            if not overflow_skipped(policy, metrics):
                _finite_or_raise(metrics, n, ckpts)
            dice = region_dice(metrics["counts"])   # this batch's Dice; liver with tumours
            last_loss = float(metrics["loss"])
            record = {"step": n, "loss": last_loss, "grad_norm": float(metrics["grad_norm"]),
                      "dice_liver": dice["liver"], "dice_tumour": dice["tumour"],
                      "lr": learning_rate(t, state.opt_state, s) if plateau else float(schedule(s)),
                      "step_time_s": dt, "data_time_s": t0 - t_data,
                      "voxels_per_s": voxels / dt}
            if policy.loss_scaling:
                record.update(loss_scale=float(metrics["loss_scale"]),
                              finite=bool(metrics["finite"]))
            log.write(record)
            tb.step(record)
            bar.set_postfix(loss=f"{last_loss:.4f}", liver=shown(dice["liver"], digits=2),
                            tumour=shown(dice["tumour"], digits=2), vox_s=f"{voxels / dt:.3g}")
            bar.update(1)
            final = n == t.steps
            if final or (t.ckpt_every > 0 and n % t.ckpt_every == 0):
                ckpts.save(n, state, {"config": config.dumps(cfg)})   # survives config.yaml
            if (final and t.eval_every >= 0) or (t.eval_every > 0 and n % t.eval_every == 0):
                last_eval = evaluate_and_log(n)
            if on_step is not None:
                on_step(n, record)
        if start >= t.steps:   # nothing left to train: the newest evaluation, made if missing
            last_eval = ckpts.evals().get(start, {}).get("metrics")
            if last_eval is None and t.eval_every >= 0 and start == t.steps:
                last_eval = evaluate_and_log(start)   # killed between checkpoint and eval
    finally:
        bar.close()
        tb.close()

    step_time = float(np.median(times)) if times else None
    voxels = float(np.mean(sizes)) if sizes else 0.0     # one size unless native buckets
    return RunResult(run_dir=run_dir, steps=max(start, t.steps), resumed_from=None,
                     final_loss=last_loss, eval=last_eval, step_time_s=step_time,
                     compile_s=compile_s,
                     voxels_per_s=voxels / step_time if step_time else None)


def describe(result: RunResult) -> str:
    """One line: speed and the last evaluation."""
    speed = (f"{result.step_time_s:.3f} s/step, {result.voxels_per_s:.3g} voxels/s on "
             f"{result.devices} device(s)" if result.step_time_s else "no timed steps")
    return f"{speed}; {inference.summary_line(result.eval)}"
