"""Stage-2 training: the sharded jitted step over
:class:`~bossa_jax.models.arranger.Stage2Model` and its data (SPEC 4.2-4.3, 7, 10.17).

The step is the generic one of :mod:`bossa_jax.train.step` with the stage-2 loss
(:func:`stage2_loss`: the MuseCoco LM loss on the arrangement tokens and the final ``</s>``,
SPEC 4.3) and one trainable filter, chosen by ``stage2.trainable``
(:data:`~bossa_jax.models.arranger.TRAINABLE_SETS`: the official query-only Q-Former + audio
LayerNorm + LoRA + projection, or the paper's LoRA + projection). The loop is stage 1's
(:func:`bossa_jax.train.loop.train`: orbax checkpoints with rng and data-iterator state, exact
resume, SIGTERM/SIGINT, metrics JSONL + TensorBoard) run with ``stage2.train`` as its ``train``
section: global batch 32 and global-norm clipping 1.0 by default (SPEC 7).

Data are stage 1's corpus, readers, codes store and feature caches (the ``data`` section, shared
by both stages), through the stage-2 pipeline (``tokens``, ``control_mask``, ``pad_mask``, SPEC
6.5). Audio in codes mode runs the frozen MusicGen inside the step, as in stage 1; in features
mode the model has no MusicGen.

Initialisation (:func:`init_fn`): ``stage2.init_from`` (a stage-1 checkpoint) fills the audio
LayerNorm, the Q-Former's query branch (its symbolic parameters are not used) and MusicGen when
the checkpoint has it; ``stage2.musecoco_checkpoint`` fills MuseCoco (and its LoRA when the
checkpoint has adapters; otherwise they keep their init, B = 0); ``data.musicgen_checkpoint``
fills MusicGen in codes mode. Each checkpoint is restored straight into the sharded model's
layout (:func:`~bossa_jax.train.stage1.restore_for`: each device reads only its shards). Whatever
is not given stays random, with a warning: a smoke run (``train.py stage2 --config
configs/tiny.yaml``) needs no checkpoint at all.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from bossa_jax import sharding
from bossa_jax.config import Config, Stage2Config
from bossa_jax.models import losses
from bossa_jax.models.arranger import (
    IGNORE_INDEX,
    TRAINABLE_SETS,
    Stage2Model,
    stage2_labels,
)
from bossa_jax.models.bossa import load_stage1
from bossa_jax.models.musecoco import load_musecoco
from bossa_jax.train import loop
from bossa_jax.train.optim import make_optimizer
from bossa_jax.train.stage1 import (
    _require_path,
    check_musicgen_source,
    eval_data,
    frozen_musicgen_config,
    init_musicgen,
    load_train_and_validation,
    refuse_before_data,
    restore_for,
    train_data,
    write_params,
)
from bossa_jax.train.step import Filter, LossFn, TrainProgram, build_program

log = logging.getLogger("bossa_jax.train")

STAGE = 2


# --- model and loss -----------------------------------------------------------------------------
def loop_config(config: Config) -> Config:
    """``config`` with ``stage2.train`` as the loop's ``train`` section (batch, schedule,
    clipping, steps, out_dir of the stage-2 run)."""
    return dataclasses.replace(config, train=config.stage2.train)


def trainable(cfg: Stage2Config) -> Filter:
    """The one trainable filter of the run (``stage2.trainable``), for the step and AdamW."""
    return TRAINABLE_SETS[cfg.trainable]


def model_fn(config: Config) -> Callable[[], Stage2Model]:
    """The stage-2 model constructor for ``sharding.create_sharded``: MusicGen (codes mode) and
    MuseCoco are frozen, so under a bf16 compute dtype they are created in bf16; the Q-Former,
    the projection and the LoRA matrices are fp32 master weights."""
    compute = jnp.dtype(config.stage2.train.compute_dtype)
    musicgen = frozen_musicgen_config(config, compute)
    musecoco = config.musecoco
    if compute == jnp.bfloat16:
        musecoco = dataclasses.replace(musecoco, dtype="bfloat16")
    qformer_dtype = None if compute == jnp.float32 else compute

    def build() -> Stage2Model:
        return Stage2Model(
            config.qformer,
            musecoco,
            musicgen,
            dtype=qformer_dtype,
            rngs=nnx.Rngs(config.stage2.train.seed),
        )

    return build


def _is_lora(path: str) -> bool:
    return ".lora." in f".{path}."


def init_fn(config: Config) -> Callable[[Stage2Model], Stage2Model]:
    """The ``loop.train`` init hook: writes converted weights into the sharded model (see the
    module docstring); runs on resume too (frozen parts are not in training checkpoints)."""
    cfg = config.stage2

    def init(model: Stage2Model) -> Stage2Model:
        musicgen_loaded = False
        if cfg.init_from:
            path = _require_path(cfg.init_from, "init_from", "stage-1 checkpoint", "stage2")
            source = restore_for(model, load_stage1, path)
            write_params(model.audio_layer_norm, source.audio_layer_norm, str(path))
            write_params(model.qformer, source.qformer, str(path))
            if model.musicgen is not None and source.musicgen is not None:
                write_params(model.musicgen, source.musicgen, str(path))
                musicgen_loaded = True
            log.info("initialised the audio LayerNorm and the Q-Former from %s", path)
            del source
        else:
            log.warning(
                "stage2.init_from is not set: the Q-Former starts from random weights "
                "(fine for smoke runs only)"
            )
        if cfg.musecoco_checkpoint:
            path = _require_path(
                cfg.musecoco_checkpoint, "musecoco_checkpoint", "converted MuseCoco", "stage2"
            )
            source = restore_for(model.musecoco, load_musecoco, path)
            # a converted HF-port MuseCoco has no adapters: they keep their init (B = 0)
            write_params(model.musecoco, source, str(path), skip=_is_lora)
            log.info("initialised MuseCoco from %s", path)
            del source
        else:
            log.warning(
                "stage2.musecoco_checkpoint is not set: MuseCoco is randomly initialised "
                "(fine for smoke runs only)"
            )
        init_musicgen(model.musicgen, config.data, musicgen_loaded)
        return model

    return init


def stage2_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SPEC 4.3: logits[:, :-1] against labels[:, 1:], plain mean cross-entropy over the labels
    that are not -100 (no label smoothing). Returns (loss, number of supervised tokens); a batch
    without any supervised token gives 0 (torch would give NaN)."""
    targets = labels[:, 1:]
    per_token = losses.cross_entropy(logits[:, :-1], targets, ignore_index=IGNORE_INDEX)
    count = jnp.sum(targets != IGNORE_INDEX)
    return per_token.sum() / jnp.maximum(count, 1).astype(jnp.float32), count


def stage2_loss_fn(
    model: Stage2Model,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    qformer_dropout: bool = False,
    musecoco_dropout: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training step's ``loss_fn(model, batch, rng) -> (loss, metrics)`` for stage 2.

    ``batch`` keys: ``tokens``, ``control_mask``, ``pad_mask``, ``audio_mask`` and either
    ``codes`` or ``features``. Metrics: ``loss`` and ``supervised_tokens`` (per global batch)."""
    logits = model(
        batch["tokens"],
        batch["pad_mask"],
        batch["audio_mask"],
        codes=batch.get("codes"),
        features=batch.get("features"),
        dropout_rng=rng,
        qformer_dropout=qformer_dropout,
        musecoco_dropout=musecoco_dropout,
    )
    labels = stage2_labels(
        batch["tokens"], batch["control_mask"], batch["pad_mask"], model.cfg.num_query_tokens
    )
    loss, count = stage2_loss(logits, labels)
    return loss, {"supervised_tokens": count.astype(jnp.float32)}


def make_loss_fn(cfg: Stage2Config, *, train: bool = True) -> LossFn:
    """``loss_fn(model, batch, rng)``: Q-Former dropout in training when ``stage2.dropout``;
    MuseCoco's dropout only with ``stage2.musecoco_dropout`` (SPEC 10.17); none in evaluation."""
    options = dict(
        qformer_dropout=train and cfg.dropout, musecoco_dropout=train and cfg.musecoco_dropout
    )

    def loss_fn(model: Stage2Model, batch: Any, rng: jax.Array):
        return stage2_loss_fn(model, batch, rng, **options)

    return loss_fn


def build_stage2_program(config: Config, mesh: Mesh) -> TrainProgram:
    """Creates the stage-2 model sharded on ``mesh`` with random weights (:func:`build_model`
    loads checkpoints), splits it by the trainable filter and builds AdamW with
    ``stage2.train.optim`` (call inside ``sharding.use_mesh``)."""
    train_cfg = config.stage2.train
    model = sharding.create_sharded(model_fn(config))
    return build_program(
        model,
        trainable(config.stage2),
        make_loss_fn(config.stage2),
        make_optimizer(train_cfg.optim, train_cfg.total_steps),
        mesh,
        compute_dtype=jnp.dtype(train_cfg.compute_dtype),
    )


# --- the run ------------------------------------------------------------------------------------
def build_model(config: Config) -> Stage2Model:
    """The stage-2 model exactly as a run of ``config`` trains it: created sharded under the
    active mesh, then filled from the configured checkpoints (:func:`init_fn`); the one
    constructor of training and resume (call inside ``sharding.use_mesh``)."""
    return init_fn(config)(sharding.create_sharded(model_fn(config)))


def run(
    config: Config, *, resume: bool = False, overwrite: bool = False, mesh: Mesh | None = None
) -> loop.TrainResult:
    """Stage-2 training with the generic loop on ``stage2.train`` (see the module docstring)."""
    run_config = loop_config(config)
    mesh = refuse_before_data(
        run_config, mesh, section="stage2.train", resume=resume, overwrite=overwrite
    )
    check_musicgen_source(config, config.stage2.init_from)
    train_split, validation = load_train_and_validation(
        run_config, eval_batches=config.stage2.eval_batches, stage=STAGE, section="stage2.train"
    )
    return loop.train(
        run_config,
        model_fn=functools.partial(build_model, config),
        trainable=trainable(config.stage2),
        loss_fn=make_loss_fn(config.stage2),
        train_data=train_data(run_config, train_split, STAGE),
        eval_data=(
            eval_data(run_config, validation, STAGE, config.stage2.eval_batches)
            if validation is not None
            else None
        ),
        eval_loss_fn=make_loss_fn(config.stage2, train=False),
        resume=resume,
        overwrite=overwrite,
        mesh=mesh,
    )
