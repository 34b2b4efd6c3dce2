"""Training and inference: everything that runs a model on data.

    step        TrainState, the jitted donated train step and predict, per backend
    loop        the training loop: batches, evaluation, NaN guard, resume (``train``)
    checkpoint  orbax checkpoints, newest-first restore
    distributed jax.distributed start for multi-host runs
    inference   prediction (whole volume or sliding window) and evaluation of a run
    sliding     Gaussian-weighted sliding-window inference for patch-trained networks

``hrseg.train`` re-exports the loop's API: ``train.train(cfg)``, ``train.evaluate(run_dir)``, ...
"""
from hrseg.train.loop import (  # noqa: F401
    CLASSES,
    Batches,
    MetricsLog,
    RunResult,
    batch_shape,
    build,
    describe,
    dice_from_counts,
    evaluate,
    load_run,
    make_optimizer,
    make_schedule,
    predict,
    prediction_path,
    train,
)
