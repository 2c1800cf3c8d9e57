"""Audio -> symbolic retrieval with the stage-1 Q-Former (paper Appendix D; SPEC 3.7, 8.3, 10.11,
11.15), done the way the paper describes rather than the way the official script runs.

Per round, ``pairs`` (default 128) distinct windows are drawn from the **test** split (seeded, one
draw per round, no augmentation unless asked: the official script transposes, SPEC 11.15). Each
audio clip is scored against every symbolic candidate of the round with the stage-1 similarity
(:meth:`~bossa_jax.models.bossa.Stage1Model.retrieval_similarity`: max over queries of the cosine
of the projected embeddings, no temperature). The candidates are put in a random order, so the
positive of audio ``i`` sits at its true index ``position[i]``, never assumed on the diagonal (the
official script's diagonal positives are right only on rank 0, SPEC 8.3).

Metrics per round: Acc@1, Acc@5 and the mean rank (1-based) of the positive. The rank counts every
other candidate scoring **at least** as high as the positive (ties count against the model), so a
collapsed model that scores all candidates equally ranks last, not first. ``rounds`` rounds (default
10) give the mean and the standard error (sample std / sqrt(rounds)), as the paper's Table 2. The
JSON report is written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bossa_jax import checkpoint, sharding
from bossa_jax.config import Config
from bossa_jax.data import pipeline as pl
from bossa_jax.errors import CheckpointError, ConfigError, DataError
from bossa_jax.models.bossa import Stage1Model
from bossa_jax.outputs import atomic_output
from bossa_jax.train.checkpoint import TrainCheckpointer
from bossa_jax.train.loop import CHECKPOINT_DIR
from bossa_jax.train.step import abstract_like, cast_floating, replicated_key

TOP_K = (1, 5)


# --- metrics ------------------------------------------------------------------------------------
def positive_ranks(similarity: np.ndarray, positives: Sequence[int]) -> np.ndarray:
    """1-based rank of each row's positive: 1 + the number of other candidates scoring at least
    as high (ties count against the positive). ``similarity`` (queries, candidates)."""
    sim = np.asarray(similarity, np.float64)
    positives = np.asarray(positives, np.int64)
    if sim.ndim != 2 or positives.shape != (sim.shape[0],):
        raise ValueError(f"similarity {sim.shape} and positives {positives.shape} do not match")
    if np.any(positives < 0) or np.any(positives >= sim.shape[1]):
        raise ValueError("a positive index is outside the candidates")
    rows = np.arange(sim.shape[0])
    score = sim[rows, positives][:, None]
    others = np.ones_like(sim, dtype=bool)
    others[rows, positives] = False
    return 1 + np.sum((sim >= score) & others, axis=1)


def retrieval_metrics(similarity: np.ndarray, positives: Sequence[int]) -> dict[str, float]:
    """Acc@1, Acc@5 and mean rank (1-based) of one round."""
    ranks = positive_ranks(similarity, positives)
    out = {f"acc@{k}": float(np.mean(ranks <= k)) for k in TOP_K}
    out["mean_rank"] = float(np.mean(ranks))
    return out


def summarize(rounds: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard error (sample std / sqrt(n); 0 for one round) of every metric."""
    out = {}
    for name in rounds[0]:
        values = np.asarray([r[name] for r in rounds], np.float64)
        stderr = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        out[name] = {"mean": float(np.mean(values)), "stderr": stderr}
    return out


# --- the model ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 3))
def _similarity(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], dtype):
    model = nnx.merge(graphdef, cast_floating(state, jnp.dtype(dtype)))
    return model.retrieval_similarity(
        batch["audio_mask"],
        batch["notes"],
        batch["leadsheet_mask"],
        batch["pad_mask"],
        codes=batch.get("codes"),
        features=batch.get("features"),
    )


# what decides the model a run trains besides its checkpoint (the frozen MusicGen and its dtype
# come from these; the trainable weights from the checkpoint)
MODEL_KEYS = (
    "qformer",
    "musicgen",
    "data.audio_input",
    "data.musicgen_checkpoint",
    "data.random_musicgen",
    "stage1.init_from",
    "train.seed",
    "train.compute_dtype",
)


def check_run_config(config: Config, run_config: str | os.PathLike) -> None:
    """A ConfigError naming the first of :data:`MODEL_KEYS` where ``config`` differs from the
    run's own ``config.yaml``: evaluating or exporting with it would rebuild another model."""
    from bossa_jax.config import load_config

    ours, theirs = config.to_dict(), load_config(run_config).to_dict()
    for key in MODEL_KEYS:
        a, b = ours, theirs
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            shown = "" if isinstance(a, dict) else f" ({a!r}, the run: {b!r})"
            raise ConfigError(
                f"config key '{key}': differs from the run's {run_config}{shown}; the model "
                f"would not be the one the run trained: use --config {run_config}"
            )


def load_model(config: Config, path: str | os.PathLike) -> Stage1Model:
    """The stage-1 model to evaluate, built by :func:`bossa_jax.train.stage1.build_model` (the
    constructor training uses, so the frozen MusicGen is the one the run trained with) from
    ``path``: a training run folder (``<out_dir>`` or its ``checkpoints/``; the latest step's
    trainable parameters restored on top; ``config`` must build the model the run's own
    ``config.yaml`` builds, :func:`check_run_config`) or a stage-1 model checkpoint
    (``save_stage1`` / ``convert.bossa``: read as ``stage1.init_from``)."""
    from bossa_jax.train import stage1

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    run_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    is_model = run_dir == path and (path / checkpoint.CONFIG_FILE).is_file()
    if is_model and checkpoint.read_config(path).get("name") == "bossa_stage1":
        stage1_cfg = dataclasses.replace(config.stage1, init_from=str(path), qformer_init="")
        config = dataclasses.replace(config, stage1=stage1_cfg)
        run_dir = None
    if run_dir is not None:
        run_config = (run_dir.parent if run_dir.name == CHECKPOINT_DIR else run_dir) / "config.yaml"
        if run_config.is_file():
            check_run_config(config, run_config)
    stage1.check_musicgen_source(config)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_of(config.mesh)):
        program = stage1.build_stage1_program(config, mesh)
        if run_dir is None:
            return program.model(program.state)
        ckpt = TrainCheckpointer(run_dir, keep=1, async_save=False)
        try:
            step = ckpt.latest_step()
            if step is None:
                raise CheckpointError(f"{path}: no training checkpoint and no stage-1 model in it")
            rng = replicated_key(0, mesh)
            state, _, _ = ckpt.restore(step, abstract_like(program.state), rng)
        finally:
            ckpt.close()
        return program.model(state)


# --- the evaluation -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
    """``pairs`` per round, ``rounds``, ``seed``; ``augment`` transposes the symbolic side as the
    official script does (SPEC 11.15)."""

    pairs: int = 128
    rounds: int = 10
    seed: int = 0
    augment: bool = False


def round_batch(
    data: Any, example_ids: Sequence[int], rng: np.random.Generator | None, deperf: bool
) -> dict[str, np.ndarray]:
    """The stage-1 arrays of ``example_ids`` (audio and symbolic of the same windows, in order)."""
    rows = []
    for eid in example_ids:
        window = data.index.examples[int(eid)].window
        sample = pl.symbolic_sample(window, 1, rng, deperf=deperf)
        sample.update(data.audio(int(eid)))
        rows.append(sample)
    keys = ("notes", "leadsheet_mask", "pad_mask", "audio_mask")
    keys += ("codes",) if "codes" in rows[0] else ("features",)
    return {k: np.stack([r[k] for r in rows]) for k in keys}


def evaluate_retrieval(
    model: Stage1Model,
    data: Any,
    options: RetrievalOptions = RetrievalOptions(),
    *,
    deperf: bool = True,
    compute_dtype: str = "float32",
) -> dict[str, Any]:
    """Runs ``options.rounds`` rounds over ``data`` (a :class:`~bossa_jax.train.stage1.Stage1Split`
    of the test split) and returns the report (summary, per-round metrics, settings)."""
    usable = np.asarray(data.usable, np.int64)
    if options.pairs < 2:
        raise DataError(f"--pairs must be at least 2, got {options.pairs}")
    if options.rounds < 1:
        raise DataError(f"--rounds must be at least 1, got {options.rounds}")
    if len(usable) < options.pairs:
        raise DataError(
            f"the {data.split!r} split has {len(usable)} usable windows, fewer than "
            f"--pairs {options.pairs}"
        )
    graphdef, state = nnx.split(model)
    per_round = []
    for r in range(options.rounds):
        rng = np.random.default_rng([options.seed, r])
        ids = rng.choice(usable, size=options.pairs, replace=False)
        order = rng.permutation(options.pairs)  # candidate j is the symbolic side of ids[order[j]]
        position = np.argsort(order)  # the candidate index of audio i's own symbolic side
        batch = round_batch(data, ids, rng if options.augment else None, deperf)
        for key in ("notes", "leadsheet_mask", "pad_mask"):
            batch[key] = batch[key][order]
        sim = np.asarray(_similarity(graphdef, state, batch, compute_dtype))
        metrics = retrieval_metrics(sim, position)
        per_round.append({"round": r, **metrics, "example_ids": [int(i) for i in ids]})
    summary = summarize([{k: v for k, v in m.items() if k not in ("round", "example_ids")}
                         for m in per_round])  # fmt: skip
    return {
        "split": data.split,
        "pairs": options.pairs,
        "rounds": options.rounds,
        "seed": options.seed,
        "augment": options.augment,
        "similarity": "a->s, max over queries of the projected cosine, no temperature",
        "rank": "1-based; ties count against the positive",
        "summary": summary,
        "per_round": per_round,
    }


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes the report as JSON, atomically."""
    import json

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return path
