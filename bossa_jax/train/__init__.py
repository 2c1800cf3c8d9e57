"""Training (DESIGN "Layout": train/): the optimizer and schedule (optim), the generic jitted steps
(step), training checkpoints (checkpoint) and the loop with logging and preemption (loop).

Stage-specific models and losses plug in as ``loss_fn(model, batch, rng) -> (loss, metrics)``
plus one trainable filter; see :func:`bossa_jax.train.loop.train`.
"""

from bossa_jax.train.checkpoint import TrainCheckpointer
from bossa_jax.train.loop import EXIT_INTERRUPTED, EXIT_PREEMPTED, TrainResult, train
from bossa_jax.train.optim import lr_schedule, make_optimizer
from bossa_jax.train.step import (
    TrainProgram,
    TrainState,
    build_program,
    compile_ahead,
    make_eval_step,
    make_train_step,
    trainable_filter,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "TrainCheckpointer",
    "TrainProgram",
    "TrainResult",
    "TrainState",
    "build_program",
    "compile_ahead",
    "lr_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "train",
    "trainable_filter",
]
