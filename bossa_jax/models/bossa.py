"""BOSSA's stage-1 model: frozen MusicGen features -> audio LayerNorm -> Q-Former with its heads,
and the three stage-1 losses (SPEC 1.3, 2.3, 3; DESIGN "Trainable vs frozen is a filter").

Parameters (official ``Blip2Qformer`` names in brackets, LAVIS aliases after a slash; see SPEC 7):

* ``musicgen`` [``musicgen_decoder.decoder``]: the frozen, truncated MusicGen decoder
  (:class:`~bossa_jax.models.musicgen.MusicgenFeatures`). ``None`` when the features come from a
  cache; the losses then take ``features`` instead of ``codes``.
* ``audio_layer_norm`` [``layer_norm`` / ``ln_audio``]: BOSSA's own trainable LayerNorm over the
  MusicGen features, fp32 statistics, eps 1e-5, weight 1 / bias 0 at init.
* ``qformer`` [``Qformer.*`` and ``query_tokens``]: :class:`~bossa_jax.models.qformer.QFormer`
  (query tokens live inside it).
* ``audio_proj`` [``audio_proj`` / ``vision_proj``], ``symbo_proj`` [``symbo_proj`` /
  ``text_proj``]: Linear(D -> 256); ``binary_head`` [``binary_head`` / ``itm_head``]:
  Linear(D -> 2); all with PyTorch's default ``nn.Linear`` init. ``temp`` [``temp``]: the
  learnable temperature, 0.07 at init, never clamped.

:data:`TRAINABLE` is the one filter of the stage-1 trainable set (everything except MusicGen); the
optimizer and the step both use it. :meth:`Stage1Model.losses` computes ITC, ITM and ITG with the
three attention-mask types of SPEC 3.5; :func:`stage1_loss_fn` adapts it to the training step's
``loss_fn(model, batch, rng) -> (loss, metrics)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from bossa_jax import checkpoint
from bossa_jax.config import STAGE1_LOSSES, Config, MusicgenConfig, QFormerConfig
from bossa_jax.errors import CheckpointError
from bossa_jax.layers import LayerNorm, Linear
from bossa_jax.models import losses
from bossa_jax.models.musicgen import MusicgenFeatures
from bossa_jax.models.qformer import FeatureKeyValues, QFormer
from bossa_jax.sharding import constrain

PROJ_DIM = 256  # ITC embedding width (SPEC 2.3)
TEMP_INIT = 0.07
AUDIO_LN_EPS = 1e-5

# The stage-1 trainable set: Q-Former (with its query tokens and LM head), audio LayerNorm,
# projections, matching head and temperature. MusicGen is frozen (SPEC 1.3, 2.3).
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("musicgen")))


def _torch_linear_init(fan_in: int):
    """PyTorch's default ``nn.Linear`` init for weight and bias: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _head(in_features: int, out_features: int, rngs: nnx.Rngs) -> Linear:
    init = _torch_linear_init(in_features)
    return Linear(
        in_features,
        out_features,
        axes=("embed", None),
        kernel_init=init,
        bias_init=init,
        rngs=rngs,
    )


def audio_front(
    qformer: QFormerConfig, musicgen: MusicgenConfig | None, *, owner: str, rngs: nnx.Rngs
) -> tuple[MusicgenFeatures | None, LayerNorm]:
    """The audio side of both stages: the frozen MusicGen (None when features come from a cache)
    and BOSSA's trainable audio LayerNorm over its features (SPEC 1.3)."""
    if musicgen is not None and musicgen.hidden_size != qformer.encoder_width:
        raise ValueError(
            f"{owner}: qformer.encoder_width ({qformer.encoder_width}) must equal "
            f"musicgen.hidden_size ({musicgen.hidden_size})"
        )
    frozen = MusicgenFeatures(musicgen, rngs=rngs) if musicgen is not None else None
    return frozen, LayerNorm(qformer.encoder_width, eps=AUDIO_LN_EPS, axis_name="feature")


def normalised_features(
    musicgen: MusicgenFeatures | None,
    audio_layer_norm: LayerNorm,
    *,
    codes: jax.Array | None = None,
    features: jax.Array | None = None,
    owner: str = "model",
) -> jax.Array:
    """Frozen MusicGen features through BOSSA's audio LayerNorm (SPEC 1.3), stages 1 and 2:
    from ``codes`` (B, 4, T) through ``musicgen`` or from cached raw ``features``
    (B, T + 4, encoder_width); exactly one of them."""
    if (codes is None) == (features is None):
        raise ValueError(f"{owner}: give exactly one of codes or features")
    if codes is not None:
        if musicgen is None:
            raise ValueError(f"{owner}: built without MusicGen; pass cached features")
        features = musicgen(codes)
    # MusicGen is frozen: no gradient ever flows into it or through its output
    return audio_layer_norm(jax.lax.stop_gradient(features))


class Stage1Model(nnx.Module):
    """Stage 1 of BOSSA (see the module docstring). ``dtype`` is the Q-Former compute dtype
    (None: fp32); MusicGen's dtype comes from its config."""

    def __init__(
        self,
        qformer: QFormerConfig,
        musicgen: MusicgenConfig | None = None,
        *,
        proj_dim: int = PROJ_DIM,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.cfg = qformer
        self.musicgen, self.audio_layer_norm = audio_front(
            qformer, musicgen, owner="Stage1Model", rngs=rngs
        )
        self.qformer = QFormer(qformer, dtype=dtype, rngs=rngs)
        d = qformer.hidden_size
        self.audio_proj = _head(d, proj_dim, rngs)
        self.symbo_proj = _head(d, proj_dim, rngs)
        self.binary_head = _head(d, 2, rngs)
        self.temp = nnx.Param(jnp.asarray(TEMP_INIT, jnp.float32))

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        with_musicgen: bool = True,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ) -> Stage1Model:
        return cls(cfg.qformer, cfg.musicgen if with_musicgen else None, dtype=dtype, rngs=rngs)

    # -- inputs ------------------------------------------------------------------------------

    def audio_features(
        self, *, codes: jax.Array | None = None, features: jax.Array | None = None
    ) -> jax.Array:
        """Frozen MusicGen features (B, S, encoder_width) through the audio LayerNorm (SPEC 1.3).

        Give ``codes`` (B, 4, T) EnCodec codes (needs ``musicgen``) or cached ``features``
        (B, T + 4, encoder_width), the raw MusicGen output before BOSSA's LayerNorm."""
        return normalised_features(
            self.musicgen,
            self.audio_layer_norm,
            codes=codes,
            features=features,
            owner="Stage1Model",
        )

    # -- the two unimodal encoders (SPEC 3.1) ------------------------------------------------

    def encode_audio(
        self,
        features: jax.Array,
        audio_mask: jax.Array | None,
        *,
        feature_kv: FeatureKeyValues | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ):
        """Normalised features -> (unit audio embeddings (B, Q, 256), query outputs (B, Q, D),
        the queries' per-layer self-attention K/V for ITG). ``feature_kv``: the features'
        cross-attention K/V when the caller has them (``QFormer.project_features``)."""
        query_out, past_kv = self.qformer.audio_pass(
            features,
            audio_mask,
            feature_kv=feature_kv,
            deterministic=deterministic,
            dropout_rng=dropout_rng,
        )
        return losses.l2_normalize(self.audio_proj(query_out)), query_out, past_kv

    def encode_symbolic(
        self,
        notes: jax.Array,
        leadsheet_mask: jax.Array,
        pad_mask: jax.Array,
        *,
        note_embeds: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Octuple ids (B, 8N) -> unit symbolic embeddings (B, 256): the output at the SOS note,
        index n_ls = number of lead-sheet notes; lead-sheet and pad notes are masked as keys.
        ``note_embeds``: ``QFormer.embed_notes(notes)`` when the caller has it."""
        key_mask = leadsheet_mask * pad_mask
        hidden = self.qformer.symbolic_pass(
            notes,
            key_mask,
            note_embeds=note_embeds,
            deterministic=deterministic,
            dropout_rng=dropout_rng,
        )
        n_leadsheet = jnp.sum(1 - leadsheet_mask, axis=-1).astype(jnp.int32)
        sos = jnp.take_along_axis(hidden, n_leadsheet[:, None, None], axis=1)[:, 0]
        return losses.l2_normalize(self.symbo_proj(sos))

    # -- losses (SPEC 3.2-3.6) ---------------------------------------------------------------

    def losses(
        self,
        notes: jax.Array,
        leadsheet_mask: jax.Array,
        pad_mask: jax.Array,
        audio_mask: jax.Array,
        *,
        codes: jax.Array | None = None,
        features: jax.Array | None = None,
        rng: jax.Array | None = None,
        negatives: tuple[jax.Array, jax.Array] | None = None,
        field_mean: losses.FieldMean = "valid",
        deterministic: bool = True,
        objectives: Sequence[str] = STAGE1_LOSSES,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Total stage-1 loss ITC + ITM + ITG (1:1:1) and its metrics, over the global batch.

        ``notes`` (B, 8N) octuple ids, ``leadsheet_mask`` (B, N) 0 on lead-sheet notes,
        ``pad_mask`` (B, N) 0 on pads, ``audio_mask`` (B, S) 1 on valid audio steps; ``codes``
        (B, 4, S - 4) or cached ``features`` (B, S, encoder_width). ITM negatives are drawn from
        ``rng`` unless ``negatives = (neg_symbo_idx, neg_audio_idx)`` is given (see
        :func:`~bossa_jax.models.losses.sample_hard_negatives`). ``deterministic=False`` turns
        dropout on (keys derived from ``rng``). ``objectives``: the losses summed into the total
        (``stage1.losses``; paper Table 2's ablations C, C+M, C+M+G); a left-out one is not
        computed. Metrics: ``loss``, ``temp``, and for each objective computed its loss (``itc``,
        ``itm``, ``itg``), with ITM ``neg_symbo_idx`` and ``neg_audio_idx``, with ITG
        ``itg_<field>`` for the 8 fields.
        """
        objectives = tuple(objectives)
        unknown = [o for o in objectives if o not in STAGE1_LOSSES]
        if unknown or not objectives:
            raise ValueError(f"Stage1Model.losses: objectives must be some of {STAGE1_LOSSES}")
        if "itm" in objectives and negatives is None and rng is None:
            raise ValueError("Stage1Model.losses: give rng or negatives for the ITM hard negatives")
        if not deterministic and rng is None:
            raise ValueError("Stage1Model.losses: dropout (deterministic=False) needs rng")
        notes, leadsheet_mask, pad_mask, audio_mask = (
            jnp.asarray(x) for x in (notes, leadsheet_mask, pad_mask, audio_mask)
        )
        keys = jax.random.split(rng, 5) if rng is not None else [None] * 5
        negative_key, audio_key, symbo_key, match_key, gen_key = keys
        drop = dict(deterministic=deterministic)

        feats = self.audio_features(codes=codes, features=features)
        # the ITM pairs reuse the B audio and B symbolic rows: their cross-attention K/V and note
        # embeddings (row-wise, before any dropout) are computed once and gathered
        feature_kv = self.qformer.project_features(feats)
        note_embeds = self.qformer.embed_notes(notes)
        audio_emb, _, past_kv = self.encode_audio(
            feats,
            audio_mask,
            feature_kv=feature_kv,
            dropout_rng=None if deterministic else audio_key,
            **drop,
        )
        temp = self.temp[...]
        metrics: dict[str, jax.Array] = {"temp": temp}
        terms = []

        if "itc" in objectives or "itm" in objectives:  # ITM draws its negatives from ITC's sims
            symbo_emb = self.encode_symbolic(
                notes,
                leadsheet_mask,
                pad_mask,
                note_embeds=note_embeds,
                dropout_rng=None if deterministic else symbo_key,
                **drop,
            )
            # ITC (unimodal masks)
            sim_a2s = losses.similarity(audio_emb, symbo_emb, temp)
            sim_s2a = sim_a2s.T
        if "itc" in objectives:
            metrics["itc"] = losses.itc_loss(sim_a2s, sim_s2a)
            terms.append(metrics["itc"])

        if "itm" in objectives:
            # ITM (bidirectional multimodal mask) on [pos ; audio negatives ; symbolic negatives]
            if negatives is None:
                negatives = losses.sample_hard_negatives(negative_key, sim_a2s, sim_s2a)
            neg_symbo_idx, neg_audio_idx = negatives
            note_key_mask = leadsheet_mask * pad_mask

            def symbolic_rows(x: jax.Array) -> jax.Array:  # [pos ; pos ; negative symbolic]
                return jnp.concatenate([x, x, x[neg_symbo_idx]], axis=0)

            def audio_rows(x: jax.Array) -> jax.Array:  # [pos ; negative audio ; pos]
                # the 3B pairs stay sharded over the batch axes (the negatives come from any shard)
                rows = jnp.concatenate([x, x[neg_audio_idx], x], axis=0)
                return constrain(rows, "batch", *(None,) * (x.ndim - 1))

            match_notes = constrain(symbolic_rows(notes), "batch", None)
            match_embeds = constrain(symbolic_rows(note_embeds), "batch", None, None)
            match_kv = jax.tree.map(audio_rows, feature_kv)
            hidden = self.qformer.multimodal_pass(
                match_notes,
                symbolic_rows(note_key_mask),
                None,
                audio_rows(audio_mask),
                note_embeds=match_embeds,
                feature_kv=match_kv,
                dropout_rng=None if deterministic else match_key,
                **drop,
            )
            match_logits = self.binary_head(hidden[:, : self.cfg.num_query_tokens])
            metrics["itm"] = losses.itm_loss(match_logits)
            metrics["neg_symbo_idx"], metrics["neg_audio_idx"] = neg_symbo_idx, neg_audio_idx
            terms.append(metrics["itm"])

        if "itg" in objectives:
            # ITG (multimodal causal mask): notes see the cached query K/V and earlier notes
            input_ids, labels = losses.itg_inputs(
                notes, leadsheet_mask, pad_mask, dec_token_id=self.cfg.dec_token_id
            )
            notes_out = self.qformer.decoder_hidden(
                input_ids, pad_mask, past_kv, dropout_rng=None if deterministic else gen_key, **drop
            )
            # the last note predicts nothing: the head runs on notes 0..N-2 only (pre-shifted)
            logits = self.qformer.lm_head(notes_out[:, :-1])
            metrics["itg"], per_field = losses.itg_loss(
                logits, labels, field_mean=field_mean, shifted=True
            )
            terms.append(metrics["itg"])
            metrics.update(
                {f"itg_{name}": per_field[i] for i, name in enumerate(losses.FIELD_NAMES)}
            )

        total = sum(terms[1:], terms[0])
        metrics["loss"] = total
        return total, metrics

    # -- retrieval (SPEC 3.7) ----------------------------------------------------------------

    def retrieval_similarity(
        self,
        audio_mask: jax.Array,
        notes: jax.Array,
        leadsheet_mask: jax.Array,
        pad_mask: jax.Array,
        *,
        codes: jax.Array | None = None,
        features: jax.Array | None = None,
    ) -> jax.Array:
        """a->s ranking scores (B_audio, B_symbo) without the temperature (SPEC 3.7): row i ranks
        the symbolic candidates for audio i; the positive of row i is column i."""
        feats = self.audio_features(codes=codes, features=features)
        audio_emb, _, _ = self.encode_audio(feats, audio_mask)
        symbo_emb = self.encode_symbolic(notes, leadsheet_mask, pad_mask)
        return losses.similarity(audio_emb, symbo_emb)


def stage1_loss_fn(
    model: Stage1Model,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    field_mean: losses.FieldMean = "valid",
    deterministic: bool = False,
    objectives: Sequence[str] = STAGE1_LOSSES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training step's ``loss_fn(model, batch, rng) -> (loss, metrics)`` for stage 1.

    ``batch`` keys: ``notes``, ``leadsheet_mask``, ``pad_mask``, ``audio_mask`` and either
    ``codes`` or ``features``. Dropout is on by default (the official model trains with the
    Q-Former's dropout 0.1); the sampled negative indices are dropped from the metrics.
    ``objectives``: the losses to train (``stage1.losses``)."""
    loss, metrics = model.losses(
        batch["notes"],
        batch["leadsheet_mask"],
        batch["pad_mask"],
        batch["audio_mask"],
        codes=batch.get("codes"),
        features=batch.get("features"),
        rng=rng,
        field_mean=field_mean,
        deterministic=deterministic,
        objectives=objectives,
    )
    metrics = {k: v for k, v in metrics.items() if not k.startswith("neg_")}
    return loss, metrics


CHECKPOINT_KIND = "stage-1 checkpoint"


def save_stage1(path: str | os.PathLike, model: Stage1Model, *, overwrite: bool = False) -> Path:
    """Writes a stage-1 model (parameters + the configs that build it) as a bossa-jax checkpoint;
    the MusicGen section is None when the model was built without MusicGen."""
    config = {
        "name": "bossa_stage1",
        "qformer": dataclasses.asdict(model.cfg),
        "musicgen": None if model.musicgen is None else dataclasses.asdict(model.musicgen.cfg),
        "proj_dim": model.audio_proj.out_features,
    }
    return checkpoint.save_module(path, model, config, kind=CHECKPOINT_KIND, overwrite=overwrite)


def load_stage1(
    path: str | os.PathLike, *, dtype: jnp.dtype | None = None, mesh: Mesh | None = None
) -> Stage1Model:
    """Restores a checkpoint written by :func:`save_stage1` (e.g. by ``python -m convert.bossa``).
    ``dtype`` is the Q-Former compute dtype of the rebuilt model.
    ``mesh`` (inside ``sharding.use_mesh``): restored straight into the declared shardings, each
    device reading only its shards (``checkpoint.load_module``)."""
    stored = checkpoint.read_config(path)
    if stored.get("name") != "bossa_stage1" or not isinstance(stored.get("qformer"), dict):
        raise CheckpointError(f"{path}: not a BOSSA stage-1 checkpoint")
    qcfg = checkpoint.read_section(path, "qformer", QFormerConfig)
    mcfg = None
    if stored.get("musicgen") is not None:
        mcfg = checkpoint.read_section(path, "musicgen", MusicgenConfig)
    proj_dim = int(stored.get("proj_dim", PROJ_DIM))
    return checkpoint.load_module(
        path,
        lambda: Stage1Model(qcfg, mcfg, proj_dim=proj_dim, dtype=dtype, rngs=nnx.Rngs(0)),
        mesh=mesh,
    )
