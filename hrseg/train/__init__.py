"""Training and inference: everything that runs a model on data.

    step        TrainState, the jitted donated train step and predict, per backend
    loop        the training loop: batches, evaluation, NaN guard, resume (``train``)
    optim       the optimizer and its learning-rate schedule (``make_optimizer``)
    evaluation  a trained run used: ``load_run``, ``evaluate``, ``predict``
    outpath     where ``predict -o`` may write (never the input, never a non-NIfTI name)
    rundir      the run directory: paths, lock, fixed config, history, metrics.jsonl
    tblog       TensorBoard event files of a run: metrics.jsonl's numbers, validation slices
    checkpoint  orbax checkpoints, newest-intact restore, retention
    distributed jax.distributed start for multi-host runs
    equivalence sharded against one device: errors of a conv and a U-Net, compiled collectives
    inference   prediction (whole volume or sliding window) and evaluation of a run
    sliding     Gaussian-weighted sliding-window inference for patch-trained networks
    stepcache   the traced, lowered train step kept as a jax.export artifact beside the
                compilation cache (hrseg.runtime.compile_cache)

``hrseg.train`` re-exports the public API: ``train.train(cfg)``, ``train.evaluate(run_dir)``, ...
The re-exports load on first use (PEP 562), so ``hrseg.train.rundir`` alone — what the napari
plugin reads run directories with — does not start jax.
"""
import importlib

_EXPORTS = {
    **dict.fromkeys(("Batches", "RunResult", "batch_shape", "build", "describe", "train"), "loop"),
    **dict.fromkeys(("evaluate", "load_run", "predict", "prediction_path"), "evaluation"),
    **dict.fromkeys(("make_optimizer", "make_schedule"), "optim"),
    **dict.fromkeys(("MetricsLog", "read_metrics"), "rundir"),
}
__all__ = ["Batches", "MetricsLog", "RunResult", "batch_shape", "build", "describe", "evaluate",
           "load_run", "make_optimizer", "make_schedule", "predict", "prediction_path",
           "read_metrics", "train"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hrseg.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hrseg.train' has no attribute {name!r}")
