"""Training and inference: everything that runs a model on data.

    step        TrainState, the jitted donated train step and predict, per backend
    loop        the training loop: batches, evaluation, NaN guard, resume (``train``)
    checkpoint  orbax checkpoints, newest-first restore
    distributed jax.distributed start for multi-host runs
    inference   whole-volume prediction and evaluation of a run

``hrseg.train`` re-exports the loop's API: ``train.train(cfg)``, ``train.evaluate(run_dir)``, ...
"""
from hrseg.train.loop import (  # noqa: F401
    Batches,
    MetricsLog,
    RunResult,
    batch_shape,
    build,
    describe,
    evaluate,
    load_run,
    make_optimizer,
    make_schedule,
    predict,
    prediction_path,
    train,
)
