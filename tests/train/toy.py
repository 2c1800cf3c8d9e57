"""A toy regression task for the training machinery: a 2-layer MLP from bossa_jax.layers behind a
frozen encoder, a grain pipeline over numpy arrays, and a CLI that runs the real loop (used by the
resume, signal and multi-process tests as a subprocess).

    python -m tests.train.toy OUT_DIR [--steps N] [--resume] [--mesh data=2,fsdp=4,tensor=1]
        [--coordinator HOST:PORT --num-processes P --process-id I] [--nan-at STEP] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bossa_jax.layers import MLP, LayerNorm, Linear

IN_FEATURES = 6
WIDTH = 16
HIDDEN = 32
NUM_SAMPLES = 256
FROZEN = ("encoder",)  # the submodule the trainable filter leaves out


class ToyModel(nnx.Module):
    """frozen encoder -> LayerNorm -> MLP -> head; dropout so the step's rng matters."""

    def __init__(self, rngs: nnx.Rngs):
        self.encoder = Linear(IN_FEATURES, WIDTH, axes=("feature", "embed"), rngs=rngs)
        self.norm = LayerNorm(WIDTH)
        self.mlp = MLP(WIDTH, HIDDEN, rngs=rngs)
        self.head = Linear(WIDTH, 1, axes=("embed", None), rngs=rngs)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        h = self.encoder(x)
        h = self.norm(h)
        h = h + self.mlp(h)
        if rng is not None:  # dropout 0.1, drawn from the step's key
            keep = jax.random.bernoulli(rng, 0.9, h.shape)
            h = jnp.where(keep, h / 0.9, 0.0)
        return self.head(h)[..., 0]


def toy_loss(model: ToyModel, batch: dict[str, jax.Array], rng: jax.Array):
    pred = model(batch["x"], rng)
    err = pred.astype(jnp.float32) - batch["y"]
    loss = jnp.mean(jnp.square(err))
    return loss, {"mae": jnp.mean(jnp.abs(err))}


def toy_eval_loss(model: ToyModel, batch: dict[str, jax.Array], rng: jax.Array):
    del rng
    return toy_loss(model, batch, None)


def toy_arrays(seed: int = 0, nan_at_sample: int | None = None) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.normal(size=(NUM_SAMPLES, IN_FEATURES)).astype(np.float32)
    y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]).astype(np.float32)
    if nan_at_sample is not None:
        x[nan_at_sample] = np.nan
    return {"x": x, "y": y}


def toy_pipeline(
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    seed: int = 0,
    arrays: dict[str, np.ndarray] | None = None,
    epochs: int | None = None,
):
    """grain: source -> seeded shuffle -> repeat -> global batch -> this process's rows."""
    arrays = toy_arrays() if arrays is None else arrays
    local = global_batch // process_count
    lo = process_index * local

    ds = (
        grain.MapDataset.range(NUM_SAMPLES)
        .shuffle(seed=seed)
        .repeat(epochs)
        .map(lambda i: {k: v[i] for k, v in arrays.items()})
        .batch(global_batch, drop_remainder=True)
        .map(lambda b: {k: v[lo : lo + local] for k, v in b.items()})
    )
    return iter(ds.to_iter_dataset())


def make_model() -> ToyModel:
    return ToyModel(nnx.Rngs(0))


TOY_OVERRIDES = (
    "train.total_steps=12",
    "train.global_batch_size=16",
    "train.optim.warmup_steps=4",
    "train.optim.lr=0.01",
    "train.optim.min_lr=0.001",
    "train.compute_dtype=float32",
    "train.log_every=2",
    "train.checkpoint_every=3",
)


def toy_config(out_dir: str, overrides: list[str] = ()):
    from bossa_jax.config import load_config

    return load_config(None, [*TOY_OVERRIDES, f"train.out_dir={out_dir}", *overrides])


def run_toy(cfg, *, resume: bool = False, nan_at: int | None = None, after_step=None, **kw):
    """Trains the toy model with the real loop; ``nan_at`` poisons the batch of that 0-based
    step (its first sample in epoch 0)."""
    from bossa_jax.sharding import create_sharded
    from bossa_jax.train import loop
    from bossa_jax.train.step import trainable_filter

    arrays = toy_arrays()
    if nan_at is not None:
        order = [int(i) for i in grain.MapDataset.range(NUM_SAMPLES).shuffle(seed=cfg.train.seed)]
        arrays = toy_arrays(nan_at_sample=order[nan_at * cfg.train.global_batch_size])

    def data(pi: int, pc: int):
        return toy_pipeline(cfg.train.global_batch_size, pi, pc, seed=cfg.train.seed, arrays=arrays)

    return loop.train(
        cfg,
        model_fn=lambda: create_sharded(make_model),
        trainable=trainable_filter(*FROZEN),
        loss_fn=toy_loss,
        train_data=data,
        resume=resume,
        after_step=after_step,
        **kw,
    )


def flat_params(params: Any) -> dict[str, np.ndarray]:
    from bossa_jax.train.loop import gather_to_host

    leaves = jax.tree_util.tree_flatten_with_path(gather_to_host(params))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def main(argv: list[str]) -> int:
    # tensorboardX imports torch whenever it is installed (seconds); the toy run needs no torch
    sys.modules.setdefault("torch", None)
    from bossa_jax.sharding import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--nan-at", type=int, help="poison the batch of this 0-based step")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (signal tests)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)

    init_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = toy_config(args.out_dir, args.overrides)

    def after_step(step: int) -> None:
        print(f"toy: step {step} done", flush=True)
        time.sleep(args.sleep)

    result = run_toy(cfg, resume=args.resume, nan_at=args.nan_at, after_step=after_step)
    params = flat_params(result.state.params)  # a collective: every process takes part
    if jax.process_index() == 0:
        np.savez(f"{args.out_dir}/final_params.npz", **params)
        print(f"toy: stopped_by={result.stopped_by} step={result.step}", flush=True)
    return result.exit_code


if __name__ == "__main__":
    from bossa_jax.errors import run_cli

    run_cli(main, sys.argv[1:])
