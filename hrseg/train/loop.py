"""Training: the loop around step.py's jitted train step — data, checkpoints, evaluation.

``train(cfg) -> RunResult`` writes ``runs/<name>/``: ``config.yaml``, ``metrics.jsonl`` (one
line per step: loss, grad norm, training Dice, learning rate, wall time, voxels/s; one line per
evaluation), ``checkpoints/`` (orbax + ``eval_<step>.json``) and ``result.json``.

Everything a step consumes is a function of ``(seed, step)``: the batch (data.batch_for_step),
the augmentation key of each case (``fold_in(fold_in(key(seed), step), row)``), and the state
restored from a checkpoint. So a run killed at any moment and resumed from its newest
checkpoint ends with bit-identical parameters on CPU, and a 2-host run sees the same batches as
a 1-host run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from hrseg import config, data
from hrseg.config import Config, TrainConfig
from hrseg.data import augment, nifti, patches
from hrseg.nn import losses, precision, unet
from hrseg.parallel import partition
from hrseg.train import checkpoint, distributed, inference, step

CLASSES = ("background", "liver", "tumour")


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


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Constant ``lr``, times ``lr_decay`` every ``lr_decay_every`` steps (Mesh-TF step decay)."""
    if cfg.lr_decay_every <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.exponential_decay(cfg.lr, transition_steps=cfg.lr_decay_every,
                                   decay_rate=cfg.lr_decay, staircase=True)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then Adafactor (the paper) or Adam on the step-decay schedule."""
    schedule = make_schedule(cfg)
    if cfg.optimizer == "adafactor":
        opt = optax.adafactor(learning_rate=schedule)
    elif cfg.optimizer == "adam":
        opt = optax.adam(learning_rate=schedule)
    else:
        raise ValueError(f"train.optimizer '{cfg.optimizer}' is not one of adafactor, adam")
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def build(cfg: Config, mesh):
    """``(graphdef, state on the mesh, optimizer)`` of a config, freshly initialised."""
    model = unet.build(cfg.model, cfg.in_channels, rngs=nnx.Rngs(cfg.train.seed))
    optimizer = make_optimizer(cfg.train)
    loss_scaling = precision.policy(cfg.model.precision).loss_scaling
    graphdef, state = step.init_state(model, optimizer, loss_scaling)
    run_mesh = partition.backend_mesh(mesh, cfg.mesh.backend)
    return graphdef, step.replicate(run_mesh, state), optimizer


def batch_shape(cfg: Config) -> tuple[int, ...]:
    """Global ``(B, *spatial, C)`` of a training batch (spatial: the patch, if any)."""
    return (cfg.train.batch, *(cfg.data.patch or cfg.data.resolution), cfg.in_channels)


def check_batch_shape(cfg: Config, run_mesh) -> None:
    """The batch must split over the mesh and pool evenly; the error names the config key."""
    try:
        partition.check_divisible(batch_shape(cfg), run_mesh, unet.levels_of(cfg.model))
    except ValueError as e:
        key = ("train.batch" if cfg.train.batch % run_mesh.shape["data"]
               else "data.patch" if cfg.data.patch else "data.resolution")
        raise ValueError(f"config key '{key}': {e}") from None


def dice_from_counts(counts) -> dict[str, float]:
    """Per-class Dice of step.py's (K, 3) intersection / predicted / true voxel counts (NaN
    if neither prediction nor label has the class). Class 1 is the tumour-free liver here;
    hrseg.metrics scores the liver with its tumours (LiTS), so the two differ a little."""
    counts = np.asarray(counts, np.float64)
    out = {}
    for k, name in enumerate(CLASSES[:len(counts)]):
        inter, pred, true = counts[k]
        out[name] = float(2 * inter / (pred + true)) if pred + true > 0 else float("nan")
    return out


class Batches:
    """This process's training data: its batch rows of each step, augmented, as global arrays.

    A process loads only the rows its devices hold (distributed.local_rows); with one process
    that is the whole batch.
    """

    def __init__(self, cfg: Config, mesh):
        self.cfg = cfg
        run_mesh = partition.backend_mesh(mesh, cfg.mesh.backend)
        ndim = cfg.model.dims
        self.shape = batch_shape(cfg)
        self.img_sharding = partition.sharding(run_mesh, partition.volume_spec(ndim))
        self.lab_sharding = partition.sharding(run_mesh, partition.label_spec(ndim))
        self.group, self.groups = distributed.local_rows(self.img_sharding, self.shape)
        if jax.process_count() > 1:
            b = self.shape[0] // self.groups
            print(f"process {jax.process_index()}/{jax.process_count()} loads batch rows "
                  f"{self.group * b}-{(self.group + 1) * b - 1} of {self.shape[0]}",
                  file=sys.stderr)
        self.ds = data.load_dataset(cfg.data, process_index=self.group,
                                    process_count=self.groups)
        self.sampler = (patches.Sampler(self.ds, cfg.data.patch, cfg.data.patch_foreground)
                        if cfg.data.patch else None)
        self._augment = jax.jit(lambda key, img, lab: augment.augment(key, img, lab, cfg.augment))

    def key(self, step_: int, row: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.train.seed),
                                                     step_), row)

    def __call__(self, step_: int):
        t = self.cfg.train
        fetch = self.sampler or (lambda *a, **k: data.batch_for_step(self.ds, *a, **k))
        images, labels = fetch(step_, t.batch, t.seed, process_index=self.group,
                               process_count=self.groups)
        images, labels = np.array(images, np.float32), np.array(labels, np.int32)
        rows = images.shape[0]
        for i in range(rows):
            img, lab = self._augment(self.key(step_, self.group * rows + i), images[i], labels[i])
            images[i], labels[i] = np.asarray(img), np.asarray(lab)
        return (distributed.global_array(self.img_sharding, images, self.shape, self.group),
                distributed.global_array(self.lab_sharding, labels, self.shape[:-1],
                                         self.group))


class MetricsLog:
    """``metrics.jsonl`` of process 0; on resume, lines past the restored step are dropped
    (the steps after the checkpoint are run again and logged again)."""

    def __init__(self, path: Path, keep_until: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= keep_until]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=checkpoint._jsonable) + "\n")


def _finite_or_raise(metrics: dict, step_no: int, ckpts: checkpoint.Checkpoints) -> None:
    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(gnorm):
        return
    ckpts.wait()  # the last good checkpoint must be complete before we stop
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
    last = ckpts.latest()
    keep = (f"the last good checkpoint is step {last} in {ckpts.directory}" if last is not None
            else "no checkpoint was written yet")
    raise FloatingPointError(f"step {step_no}: {what}; training stopped, {keep} "
                             f"(lower train.lr, or check the input data of this step)")


def _run_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / cfg.train.name


def train(cfg: Config, *, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train (or resume) the run of ``cfg``; ``on_step(step, record)`` after each step."""
    distributed.initialize(cfg.mesh)
    t = cfg.train
    main = distributed.is_main()
    run_dir = _run_dir(cfg)
    mesh = partition.make_mesh(cfg.mesh.spatial, cfg.mesh.data)
    run_mesh = partition.backend_mesh(mesh, cfg.mesh.backend)
    check_batch_shape(cfg, run_mesh)
    graphdef, state, optimizer = build(cfg, mesh)
    ckpts = checkpoint.Checkpoints(run_dir / "checkpoints", keep=t.keep_ckpts)
    resumed_from = ckpts.latest()
    if resumed_from is not None and not t.resume:
        ckpts.close()
        raise ValueError(f"{run_dir} already has checkpoints (newest: step {resumed_from}); "
                         f"set train.resume=true to continue it, or choose another train.name")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, run_dir / "config.yaml")
    distributed.barrier("config")
    if resumed_from is not None:
        state = ckpts.restore(state, resumed_from)
    start = int(state.step)

    loss_fn = losses.get(t.loss, t.ce_weights)
    policy = precision.policy(cfg.model.precision)
    train_step = step.make_train_step(graphdef, optimizer, loss_fn, mesh, cfg.mesh.backend,
                                      cfg.model.dims, policy.loss_scaling)
    batches = Batches(cfg, mesh)
    evaluator = inference.Evaluator(cfg, graphdef, mesh, batches.ds.val)
    log = MetricsLog(run_dir / "metrics.jsonl", start, main)
    schedule = make_schedule(t)
    voxels = math.prod(batch_shape(cfg)[:-1])

    bar = tqdm(total=t.steps, initial=start, disable=not (progress and main), desc=t.name,
               dynamic_ncols=True)
    times, last_loss, last_eval, compile_s = [], None, None, None
    try:
        for s in range(start, t.steps):
            t_data = time.perf_counter()
            images, labels = batches(s)
            t0 = time.perf_counter()
            state, metrics = train_step(state, images, labels)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            if compile_s is None:
                compile_s = dt
            else:
                times.append(dt)
            n = s + 1
            if not (policy.loss_scaling and not metrics["finite"]):
                _finite_or_raise(metrics, n, ckpts)
            dice = dice_from_counts(metrics["counts"])
            last_loss = float(metrics["loss"])
            record = {"step": n, "loss": last_loss, "grad_norm": float(metrics["grad_norm"]),
                      "dice_liver": dice["liver"], "dice_tumour": dice["tumour"],
                      "lr": float(schedule(s)), "step_time_s": dt, "data_time_s": t0 - t_data,
                      "voxels_per_s": voxels / dt}
            if policy.loss_scaling:
                record.update(loss_scale=float(metrics["loss_scale"]),
                              finite=bool(metrics["finite"]))
            log.write(record)
            bar.set_postfix(loss=f"{last_loss:.4f}", liver=f"{dice['liver']:.2f}",
                            tumour=f"{dice['tumour']:.2f}", vox_s=f"{voxels / dt:.3g}")
            bar.update(1)
            final = n == t.steps
            if final or (t.ckpt_every > 0 and n % t.ckpt_every == 0):
                ckpts.save(n, state)
            if (final and t.eval_every >= 0) or (t.eval_every > 0 and n % t.eval_every == 0):
                last_eval = evaluator(state, n)
                if main:
                    checkpoint.write_json(ckpts.eval_path(n),
                                          {"step": n, "config": config.to_dict(cfg),
                                           "metrics": last_eval})
                    log.write({"step": n, "eval": last_eval})
                    bar.write(f"step {n}: {inference.summary_line(last_eval)}")
            if on_step is not None:
                on_step(n, record)
    finally:
        bar.close()
        ckpts.close()

    if last_eval is None and start >= t.steps:  # nothing left to train: report the newest eval
        last_eval = ckpts.evals().get(start, {}).get("metrics")
    step_time = float(np.median(times)) if times else None
    result = RunResult(run_dir=run_dir, steps=max(start, t.steps), resumed_from=resumed_from,
                       final_loss=last_loss, eval=last_eval, step_time_s=step_time,
                       compile_s=compile_s,
                       voxels_per_s=voxels / step_time if step_time else None,
                       devices=int(run_mesh.devices.size))
    if main:
        checkpoint.write_json(run_dir / "result.json", result.to_dict())
    return result


def describe(result: RunResult) -> str:
    """One line: speed and the last evaluation."""
    speed = (f"{result.step_time_s:.3f} s/step, {result.voxels_per_s:.3g} voxels/s on "
             f"{result.devices} device(s)" if result.step_time_s else "no timed steps")
    return f"{speed}; {inference.summary_line(result.eval)}"


def load_run(run_dir: str | Path, step_no: int | None = None):
    """``(cfg, graphdef, state, mesh, step)`` of a run directory's checkpoint (default: newest).

    The run's mesh is used when this machine has its devices; otherwise one device (backend
    "none"): a run trained on a pod can be evaluated on a laptop.
    """
    run_dir = Path(run_dir)
    cfg = config.load(run_dir / "config.yaml")
    if cfg.mesh.data * math.prod(cfg.mesh.spatial) > jax.device_count():
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(
            cfg.mesh, backend="none", spatial=(1, 1, 1), data=1, distributed=False))
    mesh = partition.make_mesh(cfg.mesh.spatial, cfg.mesh.data)
    graphdef, state, _ = build(cfg, mesh)
    ckpts = checkpoint.Checkpoints(run_dir / "checkpoints", read_only=True)
    step_no = ckpts.latest() if step_no is None else step_no
    if step_no is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint in {ckpts.directory}")
    state = ckpts.restore(state, step_no)
    ckpts.close()
    return cfg, graphdef, state, mesh, step_no


def evaluate(run_dir: str | Path, step: int | None = None) -> dict:
    """Validation Dice of a run's checkpoint, written to ``checkpoints/eval_<step>.json``."""
    cfg, graphdef, state, mesh, step_no = load_run(run_dir, step)
    dataset = data.load_dataset(cfg.data)
    result = inference.Evaluator(cfg, graphdef, mesh, dataset.val)(state, step_no)
    if distributed.is_main():
        path = Path(run_dir) / "checkpoints" / f"eval_{step_no:08d}.json"
        checkpoint.write_json(path, {"step": step_no, "config": config.to_dict(cfg),
                                     "metrics": result})
    return result


def prediction_path(run_dir: str | Path, volume: str | Path) -> Path:
    """``<run>/predictions/prediction-N.nii.gz`` for LiTS ``volume-N``, else the same name."""
    name = Path(volume).name
    stem = name[:-7] if name.endswith(".nii.gz") else Path(name).stem
    if stem.startswith("volume-"):
        stem = "prediction-" + stem[len("volume-"):]
    return Path(run_dir) / "predictions" / f"{stem}.nii.gz"


def predict(run_dir: str | Path, volume: str | Path, out: str | Path | None = None) -> Path:
    """Segment a NIfTI CT volume with a run's newest checkpoint; the labels are resampled
    back to the input's voxel grid and written with its affine, so they overlay the original
    in any viewer. ``out`` defaults to :func:`prediction_path`."""
    import nibabel as nib

    cfg, graphdef, state, mesh, _ = load_run(run_dir)
    hu, _, spacing = data.read_nifti(volume)                  # canonical RAS+
    image = data.preprocess(hu, spacing, cfg.data)
    [labels] = inference.Predictor(cfg, graphdef, mesh)(state, [image])
    meta = {"grid": data.grid_for(hu.shape, spacing, cfg.data).to_dict(),
            "affine": nib.load(str(volume)).affine}             # the file's own orientation
    labels, affine = data.to_original_geometry(labels, meta)
    out = Path(out) if out else prediction_path(run_dir, volume)
    return nifti.write_nifti(out, labels, affine, dtype=np.uint8)
