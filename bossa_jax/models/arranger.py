"""BOSSA's stage-2 arranger: frozen MusicGen features -> audio LayerNorm -> the query-only Q-Former
-> projection -> MuseCoco with LoRA (SPEC 4.1-4.4; DESIGN "Trainable vs frozen is a filter").

Parameters (official ``Blip2Musecoco`` names in brackets, SPEC 7):

* ``musicgen`` [``blip2qformer.musicgen_decoder.decoder``]: the frozen MusicGen decoder, ``None``
  when features come from a cache (as in stage 1).
* ``audio_layer_norm`` [``blip2qformer.layer_norm`` / ``ln_audio``] and ``qformer``
  [``blip2qformer.Qformer.*``, ``blip2qformer.query_tokens``]: the stage-1 query branch, built
  without the symbolic branch (``symbolic_branch=False``: SPEC 4.1 deletes it).
* ``musecoco_proj`` [``musecoco_proj``]: Linear(Q-Former width -> MuseCoco width) with bias,
  PyTorch's default ``nn.Linear`` init (768 -> 2048 at paper size).
* ``musecoco`` [``musecoco.*``]: :class:`~bossa_jax.models.musecoco.MuseCoco` with LoRA on q/k/v.

Sequence layout (SPEC 4.3): the input is [proj(query outputs) (B, Q, D) ; embedded tokens
(B, 1000, D)]; the queries get no scale, position or dropout; the tokens are sqrt(D)-scaled with
fairseq positions from index :data:`POSITION_START` (61, the first ``<sep>``) on, then MuseCoco's
dropout; keys: [visible x Q ; not pad_mask]. :func:`stage2_labels` gives the official labels
(token ids, -100 on control and pad positions, left-padded with Q x -100); the loss compares
logits[:, :-1] with labels[:, 1:] (``bossa_jax.train.stage2``).

Trainable sets (one filter each, used by the step and the optimizer): :data:`TRAINABLE_OFFICIAL`
(SPEC 4.2: the whole query-only Q-Former with its query tokens, the audio LayerNorm, the LoRA
matrices and the projection: 117,348,864 parameters at paper size) and :data:`TRAINABLE_PAPER`
(the paper's LoRA + projection only).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from bossa_jax import checkpoint
from bossa_jax.config import MuseCocoConfig, MusicgenConfig, QFormerConfig
from bossa_jax.errors import CheckpointError
from bossa_jax.layers import Linear
from bossa_jax.models.bossa import _torch_linear_init, audio_front, normalised_features
from bossa_jax.models.musecoco import MuseCoco
from bossa_jax.models.qformer import QFormer

POSITION_START = 61  # token index of the first <sep>: positions start there (SPEC 4.3)
IGNORE_INDEX = -100

# SPEC 4.2: everything but the frozen MusicGen and the MuseCoco base (LoRA stays trainable)
TRAINABLE_OFFICIAL = nnx.Any(
    nnx.LoRAParam,
    nnx.All(
        nnx.Param, nnx.Not(nnx.PathContains("musicgen")), nnx.Not(nnx.PathContains("musecoco"))
    ),
)
# the paper's set (paper section 3.2: "5M" LoRA parameters) plus the projection it needs
TRAINABLE_PAPER = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("musecoco_proj")))
TRAINABLE_SETS = {"official": TRAINABLE_OFFICIAL, "lora_projection": TRAINABLE_PAPER}


class Stage2Model(nnx.Module):
    """Stage 2 of BOSSA (see the module docstring). ``dtype`` is the Q-Former compute dtype (None:
    fp32); MusicGen's and MuseCoco's dtypes come from their configs. The Q-Former is always built
    without its symbolic branch, whatever ``qformer.symbolic_branch`` says (stage 1 needs it)."""

    def __init__(
        self,
        qformer: QFormerConfig,
        musecoco: MuseCocoConfig,
        musicgen: MusicgenConfig | None = None,
        *,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        qformer = dataclasses.replace(qformer, symbolic_branch=False)
        self.cfg = qformer
        self.musicgen, self.audio_layer_norm = audio_front(
            qformer, musicgen, owner="Stage2Model", rngs=rngs
        )
        self.qformer = QFormer(qformer, dtype=dtype, rngs=rngs)
        init = _torch_linear_init(qformer.hidden_size)
        self.musecoco_proj = Linear(
            qformer.hidden_size,
            musecoco.hidden_size,
            axes=("embed", None),
            dtype=dtype,
            kernel_init=init,
            bias_init=init,
            rngs=rngs,
        )
        self.musecoco = MuseCoco(musecoco, rngs=rngs)

    def style_prefix(
        self,
        audio_mask: jax.Array | None,
        *,
        codes: jax.Array | None = None,
        features: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Audio -> the projected query outputs (B, Q, MuseCoco width): MuseCoco's prefix."""
        feats = normalised_features(
            self.musicgen, self.audio_layer_norm, codes=codes, features=features, owner="Stage2"
        )
        query_out, _ = self.qformer.audio_pass(
            feats, audio_mask, deterministic=deterministic, dropout_rng=dropout_rng
        )
        return self.musecoco_proj(query_out)

    def __call__(
        self,
        tokens: jax.Array,
        pad_mask: jax.Array,
        audio_mask: jax.Array | None,
        *,
        codes: jax.Array | None = None,
        features: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        qformer_dropout: bool = False,
        musecoco_dropout: bool = False,
    ) -> jax.Array:
        """fp32 logits (B, Q + L, vocab) of the SPEC 4.3 sequence.

        ``tokens`` (B, L) stage-2 ids, ``pad_mask`` (B, L) bool (True = padded), ``audio_mask``
        (B, S) 1 on valid audio steps; ``codes`` or cached ``features`` as in stage 1. Dropout:
        ``qformer_dropout`` in the Q-Former (official stage-2 training), ``musecoco_dropout`` in
        the frozen MuseCoco (the official quirk, SPEC 10.17); either needs ``dropout_rng``.
        """
        q_key = m_key = None
        if qformer_dropout or musecoco_dropout:
            if dropout_rng is None:
                raise ValueError("Stage2Model: dropout needs a dropout_rng key")
            q_key, m_key = jax.random.split(dropout_rng)
        prefix = self.style_prefix(
            audio_mask,
            codes=codes,
            features=features,
            deterministic=not qformer_dropout,
            dropout_rng=q_key,
        )
        return self.musecoco(
            tokens,
            jnp.asarray(pad_mask, bool),
            prefix,
            POSITION_START,
            deterministic=not musecoco_dropout,
            dropout_rng=m_key if musecoco_dropout else None,
        )


def stage2_labels(
    tokens: jax.Array, control_mask: jax.Array, pad_mask: jax.Array, num_queries: int
) -> jax.Array:
    """SPEC 4.3 labels (B, Q + L) int32: token ids with -100 where ``control_mask | pad_mask``,
    left-padded with ``num_queries`` x -100 (supervised: the arrangement and the final ``</s>``)."""
    labels = jnp.where(
        jnp.asarray(control_mask, bool) | jnp.asarray(pad_mask, bool), IGNORE_INDEX, tokens
    )
    left = jnp.full((tokens.shape[0], num_queries), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([left, labels], axis=1).astype(jnp.int32)


CHECKPOINT_KIND = "stage-2 checkpoint"


def save_stage2(path: str | os.PathLike, model: Stage2Model, *, overwrite: bool = False) -> Path:
    """Writes a stage-2 model (parameters + the configs that build it) as a bossa-jax checkpoint;
    the MusicGen section is None when the model was built without MusicGen."""
    config = {
        "name": "bossa_stage2",
        "qformer": dataclasses.asdict(model.cfg),
        "musecoco": dataclasses.asdict(model.musecoco.cfg),
        "musicgen": None if model.musicgen is None else dataclasses.asdict(model.musicgen.cfg),
    }
    return checkpoint.save_module(path, model, config, kind=CHECKPOINT_KIND, overwrite=overwrite)


def load_stage2(path: str | os.PathLike, *, dtype: jnp.dtype | None = None) -> Stage2Model:
    """Restores a checkpoint written by :func:`save_stage2` (e.g. by ``python -m convert.bossa
    --stage 2``). ``dtype`` is the Q-Former compute dtype of the rebuilt model."""
    stored = checkpoint.read_config(path)
    if stored.get("name") != "bossa_stage2":
        raise CheckpointError(f"{path}: not a BOSSA stage-2 checkpoint")
    qcfg = checkpoint.read_section(path, "qformer", QFormerConfig)
    mcfg = checkpoint.read_section(path, "musecoco", MuseCocoConfig)
    gcfg = None
    if stored.get("musicgen") is not None:
        gcfg = checkpoint.read_section(path, "musicgen", MusicgenConfig)
    return checkpoint.load_module(
        path, lambda: Stage2Model(qcfg, mcfg, gcfg, dtype=dtype, rngs=nnx.Rngs(0))
    )
