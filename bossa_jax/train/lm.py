"""Stage 0 of BOSSA-mini: pre-training the symbolic LM that stage 2 freezes (issue 11, item 3).

Where no MuseCoco weights exist, BOSSA-mini trains its own: a :class:`~bossa_jax.models.musecoco.
MuseCoco` with the ``musecoco`` section's sizes (causal linear attention, the REMI vocabulary of
SPEC 5.1) and no LoRA, on the corpus's stage-2 sequences (SPEC 6.5)::

    </s> + attributes + <sep> + lead-sheet REMI + <sep> + arrangement REMI + </s>

with positions from the first ``<sep>`` (index 61) as stage 2 gives them (SPEC 4.3), so the frozen
LM already continues a lead-sheet prompt with an arrangement and stage 2 only has to learn the
style from the audio queries. The loss is next-token cross-entropy on the arrangement and the final
``</s>`` (as stage 2's, :func:`bossa_jax.train.stage2.stage2_loss`) and, with
``stage0.prompt_loss``, on the lead-sheet prompt too (the lead sheets are the corpus's other half).

The loop is the project's (:func:`bossa_jax.train.loop.train`) with ``stage0.train`` as its
``train`` section; the data are stage 1's corpus, readers and pipelines (the ``data`` section's
data settings, the stage-2 layout of ``stage2.max_tokens`` tokens); the audio fields of the
batches are not read by the loss. :func:`export` writes the trained LM as a MuseCoco checkpoint
(``save_musecoco``), what ``stage2.musecoco_checkpoint`` reads (its LoRA adapters keep their
init, B = 0).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bossa_jax import sharding
from bossa_jax.config import Config, Stage0Config
from bossa_jax.errors import CheckpointError
from bossa_jax.models.arranger import IGNORE_INDEX, POSITION_START
from bossa_jax.models.musecoco import CHECKPOINT_KIND, MuseCoco, save_musecoco
from bossa_jax.symbolic import remi
from bossa_jax.train import loop
from bossa_jax.train.checkpoint import TrainCheckpointer
from bossa_jax.train.optim import make_optimizer
from bossa_jax.train.stage1 import (
    STAGE2_SYMBOLIC_KEYS,
    ModelFields,
    load_train_and_validation,
    make_pipeline,
    refuse_before_data,
)
from bossa_jax.train.stage2 import stage2_loss
from bossa_jax.train.step import (
    LossFn,
    TrainProgram,
    abstract_like,
    build_program,
    replicated_key,
    trainable_filter,
)

STAGE = 2  # the stage-2 sequence layout
TRAINABLE = trainable_filter()  # every parameter of the LM


def loop_config(config: Config) -> Config:
    """``config`` with ``stage0.train`` as the loop's ``train`` section."""
    return dataclasses.replace(config, train=config.stage0.train)


def lm_config(config: Config):
    """The stage-0 LM's MuseCoco config: the ``musecoco`` sizes without LoRA, in the compute
    dtype of ``stage0.train`` (fp32 master weights come from the step's cast otherwise)."""
    return dataclasses.replace(config.musecoco, lora=False, dtype="float32")


def model_fn(config: Config) -> Callable[[], MuseCoco]:
    cfg = lm_config(config)

    def build() -> MuseCoco:
        return MuseCoco(cfg, rngs=nnx.Rngs(config.stage0.train.seed))

    return build


def build_model(config: Config) -> MuseCoco:
    """The stage-0 LM, created sharded under the active mesh (random init)."""
    return sharding.create_sharded(model_fn(config))


def lm_labels(
    tokens: jax.Array, control_mask: jax.Array, pad_mask: jax.Array, prompt_loss: bool
) -> jax.Array:
    """Targets (B, L) int32: the token ids, -100 on padding and, unless ``prompt_loss``, on the
    prompt (then exactly stage 2's labels without the query columns). The first ``</s>`` is never
    a target: nothing comes before it."""
    ignored = jnp.asarray(pad_mask, bool)
    if not prompt_loss:
        ignored = ignored | jnp.asarray(control_mask, bool)
    return jnp.where(ignored, IGNORE_INDEX, tokens).astype(jnp.int32)


def with_style_attribute(
    tokens: jax.Array, style: jax.Array, rng: jax.Array, rate: float
) -> jax.Array:
    """``tokens`` (B, L) with the genre attribute ``S4_<k>_0`` at its prompt slot for a random
    ``rate`` share of the rows whose ``style`` index k is >= 0 (-1: no label; see
    ``Stage0Config``)."""
    style = jnp.asarray(style, jnp.int32)
    slot = remi.GENRE_POSITION + jnp.maximum(style, 0)
    rows = jnp.arange(tokens.shape[0])
    present = jnp.asarray(remi.GENRE_PRESENT_IDS, tokens.dtype)[jnp.maximum(style, 0)]
    named = (style >= 0) & (jax.random.uniform(rng, style.shape) < rate)
    return tokens.at[rows, slot].set(jnp.where(named, present, tokens[rows, slot]))


def lm_loss_fn(
    model: MuseCoco,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    prompt_loss: bool = True,
    dropout: bool = False,
    style_attribute_rate: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The step's ``loss_fn``: next-token cross-entropy over the stage-2 sequence (see the module
    docstring), with the style attribute of ``Stage0Config`` when ``style_attribute_rate`` > 0
    (the batch then has ``style``). Metrics: ``loss``, ``arrangement_loss`` (the arrangement and
    ``</s>`` only: what stage 2 optimises) and ``supervised_tokens``."""
    tokens, control, pad = batch["tokens"], batch["control_mask"], batch["pad_mask"]
    if style_attribute_rate > 0:
        rng, style_rng = jax.random.split(rng)
        tokens = with_style_attribute(tokens, batch["style"], style_rng, style_attribute_rate)
    logits = model(
        tokens,
        jnp.asarray(pad, bool),
        None,
        POSITION_START,
        deterministic=not dropout,
        dropout_rng=rng if dropout else None,
    )
    loss, count = stage2_loss(logits, lm_labels(tokens, control, pad, prompt_loss))
    arrangement, _ = stage2_loss(logits, lm_labels(tokens, control, pad, False))
    return loss, {
        "arrangement_loss": arrangement,
        "supervised_tokens": count.astype(jnp.float32),
    }


def make_loss_fn(cfg: Stage0Config, *, train: bool = True) -> LossFn:
    options = dict(
        prompt_loss=cfg.prompt_loss,
        dropout=train and cfg.dropout,
        style_attribute_rate=cfg.style_attribute_rate if train else 0.0,
    )

    def loss_fn(model: MuseCoco, batch: Any, rng: jax.Array):
        return lm_loss_fn(model, batch, rng, **options)

    return loss_fn


def build_lm_program(config: Config, mesh: Mesh) -> TrainProgram:
    """The stage-0 model split for training with AdamW of ``stage0.train.optim`` (call inside
    ``sharding.use_mesh``)."""
    train_cfg = config.stage0.train
    return build_program(
        build_model(config),
        TRAINABLE,
        make_loss_fn(config.stage0),
        make_optimizer(train_cfg.optim, train_cfg.total_steps),
        mesh,
        compute_dtype=jnp.dtype(train_cfg.compute_dtype),
    )


# --- data ---------------------------------------------------------------------------------------
class WithStyle(ModelFields):
    """The step's fields plus ``style`` (B,) int32: the index of the example's song's manifest
    ``style`` in ``styles`` (-1 when it has none or another)."""

    def __init__(self, iterator: Any, keys: tuple[str, ...], style_of_example: np.ndarray):
        super().__init__(iterator, keys)
        self.style_of_example = style_of_example

    def fields(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().fields(batch)
        out["style"] = self.style_of_example[np.asarray(batch["example_id"])]
        return out


def style_indices(pipe: Any, styles: tuple[str, ...]) -> np.ndarray:
    """(examples,) int32: each example's song's style as its index in ``styles``, else -1."""
    index = {name: k for k, name in enumerate(styles)}
    songs = np.array([index.get(r.style, -1) for r in pipe.index.records], np.int32)
    return songs[np.array([e.song_index for e in pipe.index.examples], np.int64)]


def _data(config: Config, data: Any, *, train: bool, batches: int = 0):
    stage0 = config.stage0

    def factory(process_index: int, process_count: int):
        pipe = make_pipeline(config, data, process_index, process_count, train=train, stage=STAGE)
        if train and stage0.style_attribute_rate > 0:
            iterator = WithStyle(
                pipe.iterator(), STAGE2_SYMBOLIC_KEYS, style_indices(pipe, stage0.styles)
            )
        else:
            iterator = ModelFields(pipe.iterator(), STAGE2_SYMBOLIC_KEYS)
        if train:
            return iterator
        return (next(iterator) for _ in range(min(batches, pipe.steps_per_epoch)))

    return factory


# --- the run ------------------------------------------------------------------------------------
def run(
    config: Config, *, resume: bool = False, overwrite: bool = False, mesh: Mesh | None = None
) -> loop.TrainResult:
    """Stage-0 training with the generic loop on ``stage0.train`` (see the module docstring)."""
    run_config = loop_config(config)
    mesh = refuse_before_data(
        run_config, mesh, section="stage0.train", resume=resume, overwrite=overwrite
    )
    train_split, validation = load_train_and_validation(
        run_config, eval_batches=config.stage0.eval_batches, stage=STAGE, section="stage0.train"
    )
    return loop.train(
        run_config,
        model_fn=functools.partial(build_model, config),
        trainable=TRAINABLE,
        loss_fn=make_loss_fn(config.stage0),
        train_data=_data(run_config, train_split, train=True),
        eval_data=(
            _data(run_config, validation, train=False, batches=config.stage0.eval_batches)
            if validation is not None
            else None
        ),
        eval_loss_fn=make_loss_fn(config.stage0, train=False),
        resume=resume,
        overwrite=overwrite,
        mesh=mesh,
    )


def restore_latest(program: TrainProgram, run_dir: str | Path) -> nnx.Module:
    """The model of ``program`` with the trainable parameters of the latest checkpoint of the
    training run in ``run_dir`` (any stage: the program must be built as the run built it)."""
    ckpt = TrainCheckpointer(Path(run_dir) / loop.CHECKPOINT_DIR, keep=1, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"{run_dir}: no training checkpoint in it")
        rng = replicated_key(0, program.mesh)
        state, _, _ = ckpt.restore(step, abstract_like(program.state), rng)
    finally:
        ckpt.close()
    return program.model(state)


def export(
    config: Config, run_dir: str | Path, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Writes the LM of a stage-0 run (its latest checkpoint) as a MuseCoco checkpoint at ``out``
    (``save_musecoco``; ``stage2.musecoco_checkpoint`` reads it)."""
    from bossa_jax.outputs import check_output

    if not loop.checkpoint_steps(run_dir):
        raise CheckpointError(f"{run_dir}: not a stage-0 run (no checkpoints/ with a step in it)")
    check_output(out, CHECKPOINT_KIND, folder=True, overwrite=overwrite, sources=[run_dir])
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_of(config.mesh)):
        model = restore_latest(build_lm_program(config, mesh), run_dir)
        return save_musecoco(out, model, overwrite=overwrite)
