"""The BOSSA Q-Former: a MusicBERT-initialised BERT over octuple notes with learned queries that
cross-attend to MusicGen features (SPEC 2.1-2.2, 3.1-3.5).

Structure (official ``model_Qformer.py``, LAVIS's Q-Former with BOSSA's octuple embedding):

* Embeddings: one word table of ``vocab_size + 1`` rows (the last row is [DEC], padding row
  ``pad_token_id``; the pad row gets no gradient, as with torch's ``padding_idx``). The 8 ids of a
  note are embedded, concatenated to (B, N, 8*D) and reduced by ``downsampling`` Linear(8D -> D);
  learned positions by **note index 0..N-1** are added; the queries (1, Q, D) are prepended
  **after** the position add (they get no position); then LayerNorm + dropout over everything.
* Layers: post-LN BERT blocks. Self-attention is shared by queries and notes; in layers with
  ``i % cross_attention_freq == 0`` the first ``Q`` positions (queries only) cross-attend to the
  audio features (keys/values Linear(encoder_width -> D)); the FFN is separate: ``query_mlp`` for
  query positions, ``text_mlp`` for note positions. Without queries there is no cross-attention.
* Masks (SPEC 2.2, 3.5): self-attention adds **-10000** to masked keys (the official extended mask,
  so a fully masked row behaves as in PyTorch); cross-attention masks keys with HF
  ``invert_attention_mask``'s finfo(fp32).min, which is implemented here as a boolean mask: both
  give exactly zero weight to masked keys and an exactly uniform row when all keys are masked, and
  the boolean form stays finite in bf16.
* LM head: ``upsampling`` Linear(D -> 8D), reshape to (B, 8N, D) (slot j of note i = dims
  j*D..(j+1)*D), dense + GELU + LayerNorm, untied decoder Linear(D -> vocab_size) with bias.

The four call patterns of stage 1 are the public methods: :meth:`QFormer.audio_pass` (SPEC 3.1,
ITC audio side; also returns the queries' self-attention keys/values per layer for ITG),
:meth:`QFormer.symbolic_pass` (SPEC 3.1), :meth:`QFormer.multimodal_pass` (SPEC 3.3, ITM) and
:meth:`QFormer.decoder_logits` (SPEC 3.4, ITG). Dropout (hidden and attention probabilities) is on
only when ``deterministic=False`` and a ``dropout_rng`` key is given; attention (with its dropout,
past keys/values and returned K/V) is the shared :class:`~bossa_jax.layers.Attention`. A caller
that runs several patterns on the same rows (the stage-1 losses) can compute
:meth:`QFormer.embed_notes` and :meth:`QFormer.project_features` once and pass them in.

``cfg.symbolic_branch=False`` builds the stage-2 Q-Former (SPEC 4.1): word and position embeddings,
downsampling, every layer's text FFN and the LM head are not built, and only
:meth:`QFormer.audio_pass` is available.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bossa_jax.config import QFormerConfig
from bossa_jax.layers import MLP, Attention, Dropout, Embed, LayerNorm, Linear
from bossa_jax.layers.attention import KeyValue
from bossa_jax.layers.linear import default_kernel_init
from bossa_jax.layers.mlp import activation
from bossa_jax.sharding import constrain

FIELDS_PER_NOTE = 8  # one octuple note = 8 ids (SPEC 5.2)
SELF_ATTENTION_MASK_VALUE = -10000.0  # official get_extended_attention_mask (SPEC 2.2)
ACTIVATION_AXES = ("batch", "length", "embed")

PastKeyValues = tuple[KeyValue, ...]  # one (k, v) per layer
FeatureKeyValues = tuple[KeyValue | None, ...]  # per layer; None without cross-attention


def _first(feature_kv: FeatureKeyValues) -> jax.Array:
    """The keys of the first cross-attention layer (for their batch size)."""
    return next(kv for kv in feature_kv if kv is not None)[0]


def key_mask_bias(key_mask: jax.Array) -> jax.Array:
    """(B, S) mask (1 = attend) -> (B, 1, 1, S) additive bias, -10000 on masked keys (SPEC 2.2)."""
    keep = key_mask.astype(jnp.float32)
    return ((1.0 - keep) * SELF_ATTENTION_MASK_VALUE)[:, None, None, :]


def decoder_bias(pad_mask: jax.Array, num_prefix: int) -> jax.Array:
    """Decoder-mode additive mask (SPEC 3.4): each of the N notes sees all ``num_prefix`` cached
    query keys and the notes <= itself; notes with ``pad_mask == 0`` are masked as keys.
    (B, N) -> (B, 1, N, num_prefix + N)."""
    batch, n = pad_mask.shape
    causal = jnp.tril(jnp.ones((n, n), jnp.float32))
    visible = jnp.concatenate([jnp.ones((n, num_prefix), jnp.float32), causal], axis=-1)
    keys = jnp.concatenate(
        [jnp.ones((batch, num_prefix), jnp.float32), pad_mask.astype(jnp.float32)], axis=-1
    )
    keep = visible[None, None] * keys[:, None, None, :]
    return (1.0 - keep) * SELF_ATTENTION_MASK_VALUE


class QFormerLayer(nnx.Module):
    """One post-LN BERT block with shared self-attention, optional query cross-attention and
    separate query/text FFNs (official ``BertLayer``, SPEC 2.2)."""

    def __init__(
        self,
        cfg: QFormerConfig,
        *,
        has_cross_attention: bool,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = Attention(d, cfg.num_attention_heads, dtype=dtype, rngs=rngs)
        self.self_attn_norm = LayerNorm(d, eps=eps)
        if has_cross_attention:
            self.cross_attn = Attention(
                d,
                cfg.num_attention_heads,
                kv_features=cfg.encoder_width,
                kv_axis="feature",
                dtype=dtype,
                rngs=rngs,
            )
            self.cross_attn_norm = LayerNorm(d, eps=eps)
        else:
            self.cross_attn = None
            self.cross_attn_norm = None
        mlp = dict(act=cfg.hidden_act, dtype=dtype, rngs=rngs)
        if cfg.symbolic_branch:
            self.text_mlp = MLP(d, cfg.intermediate_size, **mlp)
            self.text_norm = LayerNorm(d, eps=eps)
        else:  # stage 2: the note stream's FFN is deleted (SPEC 4.1)
            self.text_mlp = None
            self.text_norm = None
        self.query_mlp = MLP(d, cfg.intermediate_size, **mlp)
        self.query_norm = LayerNorm(d, eps=eps)

    def __call__(
        self,
        x: jax.Array,
        *,
        query_length: int,
        self_bias: jax.Array | None,
        feature_kv: KeyValue | None,
        feature_mask: jax.Array | None,
        past: KeyValue | None,
        dropout: Dropout,
        hidden_dropout: float,
        attention_dropout: float,
    ) -> tuple[jax.Array, KeyValue]:
        """x (B, L, D) with the first ``query_length`` positions being queries; ``feature_kv`` the
        cross-attention (k, v) of the audio features (:meth:`QFormer.project_features`); returns
        the block output and this layer's self-attention (k, v) of ``x`` (without ``past``)."""
        attn_out, kv = self.self_attn(
            x,
            bias=self_bias,
            past=past,
            dropout=dropout,
            dropout_rate=attention_dropout,
            return_kv=True,
        )
        h = self.self_attn_norm(dropout(attn_out, hidden_dropout) + x)
        if query_length == 0:
            return self._ffn(self.text_mlp, self.text_norm, h, dropout, hidden_dropout), kv
        queries = h[:, :query_length]
        if self.cross_attn is not None:
            if feature_kv is None:
                raise ValueError("QFormer: queries in a cross-attention layer need audio features")
            cross_out, _ = self.cross_attn(
                queries,
                projected=feature_kv,
                mask=feature_mask,
                dropout=dropout,
                dropout_rate=attention_dropout,
            )
            queries = self.cross_attn_norm(dropout(cross_out, hidden_dropout) + queries)
        out = self._ffn(self.query_mlp, self.query_norm, queries, dropout, hidden_dropout)
        if h.shape[1] > query_length:
            notes = self._ffn(
                self.text_mlp, self.text_norm, h[:, query_length:], dropout, hidden_dropout
            )
            out = jnp.concatenate([out, notes], axis=1)
        return out, kv

    @staticmethod
    def _ffn(mlp: MLP, norm: LayerNorm, x: jax.Array, dropout: Dropout, rate: float) -> jax.Array:
        return norm(dropout(mlp(x), rate) + x)


class QFormerLMHead(nnx.Module):
    """``upsampling`` + ``cls.predictions`` of the official ``BertLMHeadModel`` (SPEC 2.2)."""

    def __init__(self, cfg: QFormerConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        d = cfg.hidden_size
        common = dict(dtype=dtype, rngs=rngs)
        self.act = cfg.hidden_act
        self.upsampling = Linear(d, FIELDS_PER_NOTE * d, axes=("embed", "mlp"), **common)
        self.dense = Linear(d, d, axes=("embed", "mlp"), **common)
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.decoder = Linear(d, cfg.vocab_size, axes=("embed", "vocab"), **common)

    def __call__(self, notes: jax.Array) -> jax.Array:
        """(B, N, D) note-stream states -> (B, 8N, vocab_size) logits."""
        batch, n, d = notes.shape
        x = self.upsampling(notes).reshape(batch, n * FIELDS_PER_NOTE, d)
        x = constrain(x, *ACTIVATION_AXES)
        x = self.norm(activation(self.act)(self.dense(x)))
        return constrain(self.decoder(x), "batch", "length", "vocab")


class QFormer(nnx.Module):
    """The Q-Former with its LM head and query tokens (SPEC 2). See the module docstring.

    Inputs: ``note_ids`` (B, 8N) int octuple ids (MusicBERT dictionary, [DEC] = ``vocab_size``);
    masks are 1 = visible key, 0 = masked; ``features`` (B, S, encoder_width) audio features.
    """

    def __init__(self, cfg: QFormerConfig, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        pad = cfg.pad_token_id

        def word_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
            return default_kernel_init(key, shape, dtype).at[pad].set(0)  # torch padding_idx row

        if cfg.symbolic_branch:
            # 1238 rows divide no mesh axis: sharding.named_shardings leaves that dim replicated
            self.word_embeddings = Embed(
                cfg.vocab_size + 1,
                d,
                axes=("vocab", "embed"),
                dtype=dtype,
                embedding_init=word_init,
                rngs=rngs,
            )
            self.downsampling = Linear(
                FIELDS_PER_NOTE * d, d, axes=("mlp", "embed"), dtype=dtype, rngs=rngs
            )
            self.position_embeddings = Embed(
                cfg.max_position_embeddings, d, axes=("length", "embed"), dtype=dtype, rngs=rngs
            )
        else:  # stage 2 keeps only the query branch (SPEC 4.1): audio_pass alone works
            self.word_embeddings = self.downsampling = self.position_embeddings = None
        self.query_tokens = nnx.Param(
            default_kernel_init(rngs.params(), (1, cfg.num_query_tokens, d), jnp.float32),
            out_sharding=(None, "query", "embed"),
        )
        self.embed_norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        # string keys "0".."L-1" (not nnx.List): checkpoints round-trip them unchanged
        self.layers = nnx.Dict(
            {
                str(i): QFormerLayer(
                    cfg,
                    has_cross_attention=i % cfg.cross_attention_freq == 0,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(cfg.num_hidden_layers)
            }
        )
        self.lm_head = QFormerLMHead(cfg, dtype=dtype, rngs=rngs) if cfg.symbolic_branch else None

    # -- embeddings --------------------------------------------------------------------------

    def embed_notes(self, note_ids: jax.Array) -> jax.Array:
        """(B, 8N) ids -> (B, N, D): word embeddings, downsampling, note-index positions."""
        batch, num_ids = note_ids.shape
        if num_ids % FIELDS_PER_NOTE:
            raise ValueError(f"QFormer: note_ids length {num_ids} is not a multiple of 8")
        n = num_ids // FIELDS_PER_NOTE
        if n > self.cfg.max_position_embeddings:
            raise ValueError(
                f"QFormer: {n} notes exceed max_position_embeddings "
                f"({self.cfg.max_position_embeddings})"
            )
        if not self.cfg.symbolic_branch:
            raise ValueError("QFormer: built without its symbolic branch (stage 2); no notes")
        words = self.word_embeddings(note_ids)
        # torch's padding_idx: the pad row is looked up but receives no gradient
        is_pad = (note_ids == self.cfg.pad_token_id)[..., None]
        words = jnp.where(is_pad, jax.lax.stop_gradient(words), words)
        x = self.downsampling(words.reshape(batch, n, FIELDS_PER_NOTE * words.shape[-1]))
        return x + self.position_embeddings(jnp.arange(n))[None].astype(x.dtype)

    def _embed(
        self,
        note_ids: jax.Array | None,
        with_queries: bool,
        batch: int,
        dropout: Dropout,
        note_embeds: jax.Array | None = None,
    ) -> jax.Array:
        parts = []
        if with_queries:
            queries = self.query_tokens[...]
            parts.append(jnp.broadcast_to(queries, (batch,) + queries.shape[1:]))
        if note_embeds is not None:
            parts.append(note_embeds)
        elif note_ids is not None:
            parts.append(self.embed_notes(note_ids))
        dtype = parts[-1].dtype
        x = jnp.concatenate([p.astype(dtype) for p in parts], axis=1)
        x = dropout(self.embed_norm(x), self.cfg.hidden_dropout)
        return constrain(x, *ACTIVATION_AXES)

    # -- the layer stack ---------------------------------------------------------------------

    def project_features(self, features: jax.Array) -> FeatureKeyValues:
        """Audio features (B, S, encoder_width) -> per layer, the cross-attention (k, v), each
        (B, S, heads, head_dim) (None in layers without cross-attention). The audio pass and
        the matching pass see the same feature rows: projected once, gathered for the pairs."""
        features = features.astype(self.query_tokens[...].dtype)
        return tuple(
            None if layer.cross_attn is None else layer.cross_attn.project_kv(features)
            for layer in (self.layers[str(i)] for i in range(len(self.layers)))
        )

    def _encode(
        self,
        x: jax.Array,
        *,
        query_length: int,
        self_bias: jax.Array | None,
        features: jax.Array | None = None,
        feature_kv: FeatureKeyValues | None = None,
        feature_mask: jax.Array | None = None,
        past_kv: PastKeyValues | None = None,
        dropout: Dropout,
    ) -> tuple[jax.Array, PastKeyValues]:
        if feature_kv is None and features is not None and query_length > 0:
            feature_kv = self.project_features(features)
        if feature_kv is not None and feature_mask is not None:
            feature_mask = feature_mask.astype(bool)[:, None, None, :]
        if past_kv is not None and len(past_kv) != len(self.layers):
            raise ValueError(
                f"QFormer: past_kv has {len(past_kv)} layers, the model {len(self.layers)}"
            )

        def run_layer(layer, x, self_bias, kv, feature_mask, past):
            return layer(
                x,
                query_length=query_length,
                self_bias=self_bias,
                feature_kv=kv,
                feature_mask=feature_mask,
                past=past,
                dropout=dropout,
                hidden_dropout=self.cfg.hidden_dropout,
                attention_dropout=self.cfg.attention_dropout,
            )

        if self.cfg.remat:
            run_layer = nnx.remat(run_layer)
        kvs = []
        for i in range(len(self.layers)):
            past = None if past_kv is None else past_kv[i]
            layer_kv = None if feature_kv is None else feature_kv[i]
            x, kv = run_layer(self.layers[str(i)], x, self_bias, layer_kv, feature_mask, past)
            x = constrain(x, *ACTIVATION_AXES)
            kvs.append(kv)
        return x, tuple(kvs)

    # -- the call patterns of stage 1 --------------------------------------------------------

    def audio_pass(
        self,
        features: jax.Array | None,
        feature_mask: jax.Array | None = None,
        *,
        feature_kv: FeatureKeyValues | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, PastKeyValues]:
        """Queries only, bidirectional among themselves, cross-attending to the valid audio steps
        (SPEC 3.1). ``features`` (B, S, encoder_width), ``feature_mask`` (B, S) or None;
        ``feature_kv``: :meth:`project_features` of them when the caller has it (then
        ``features`` may be None).

        Returns ``query_out`` (B, Q, D) and, per layer, the queries' self-attention (k, v), each
        (B, Q, heads, head_dim): the ``past_key_values`` that :meth:`decoder_logits` reuses.
        """
        dropout = Dropout.stream(deterministic, dropout_rng, "QFormer")
        batch = (features if feature_kv is None else _first(feature_kv)).shape[0]
        x = self._embed(None, True, batch, dropout)
        return self._encode(
            x,
            query_length=self.cfg.num_query_tokens,
            self_bias=None,
            features=features,
            feature_kv=feature_kv,
            feature_mask=feature_mask,
            dropout=dropout,
        )

    def symbolic_pass(
        self,
        note_ids: jax.Array,
        key_mask: jax.Array | None = None,
        *,
        note_embeds: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Notes only, no queries, no cross-attention, bidirectional (SPEC 3.1).
        ``note_ids`` (B, 8N); ``key_mask`` (B, N), 0 = masked as key (lead sheet, pads);
        ``note_embeds``: :meth:`embed_notes` of ``note_ids`` when the caller has it.
        Returns hidden states (B, N, D)."""
        dropout = Dropout.stream(deterministic, dropout_rng, "QFormer")
        x = self._embed(note_ids, False, note_ids.shape[0], dropout, note_embeds)
        bias = None if key_mask is None else key_mask_bias(key_mask)
        hidden, _ = self._encode(x, query_length=0, self_bias=bias, dropout=dropout)
        return hidden

    def multimodal_pass(
        self,
        note_ids: jax.Array,
        note_key_mask: jax.Array,
        features: jax.Array | None,
        feature_mask: jax.Array | None = None,
        *,
        note_embeds: jax.Array | None = None,
        feature_kv: FeatureKeyValues | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """[queries ; notes] in one bidirectional pass (SPEC 3.3, ITM): every position sees all
        queries and the notes with ``note_key_mask == 1``; queries cross-attend to ``features``.
        ``note_embeds`` / ``feature_kv``: :meth:`embed_notes` of the ids / :meth:`project_features`
        of the features when the caller has them (then ``features`` may be None).
        Returns hidden states (B, Q + N, D) (queries first)."""
        dropout = Dropout.stream(deterministic, dropout_rng, "QFormer")
        batch = note_ids.shape[0]
        q = self.cfg.num_query_tokens
        x = self._embed(note_ids, True, batch, dropout, note_embeds)
        key_mask = jnp.concatenate(
            [jnp.ones((batch, q), note_key_mask.dtype), note_key_mask], axis=1
        )
        hidden, _ = self._encode(
            x,
            query_length=q,
            self_bias=key_mask_bias(key_mask),
            features=features,
            feature_kv=feature_kv,
            feature_mask=feature_mask,
            dropout=dropout,
        )
        return hidden

    def decoder_hidden(
        self,
        note_ids: jax.Array,
        pad_mask: jax.Array,
        past_kv: PastKeyValues,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """The note stream of the ITG pass (SPEC 3.4) before the LM head: (B, N, D)."""
        dropout = Dropout.stream(deterministic, dropout_rng, "QFormer")
        x = self._embed(note_ids, False, note_ids.shape[0], dropout)
        num_prefix = past_kv[0][0].shape[1]
        hidden, _ = self._encode(
            x,
            query_length=0,
            self_bias=decoder_bias(pad_mask, num_prefix),
            past_kv=past_kv,
            dropout=dropout,
        )
        return hidden

    def decoder_logits(
        self,
        note_ids: jax.Array,
        pad_mask: jax.Array,
        past_kv: PastKeyValues,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """ITG (SPEC 3.4): notes (SOS ids already replaced by [DEC]) attend to all cached query
        keys/values of :meth:`audio_pass` and causally to notes <= themselves, pads
        (``pad_mask == 0``) masked as keys; no queries are re-fed, no cross-attention.
        Returns LM logits (B, 8N, vocab_size); unshifted (the loss shifts by one note)."""
        hidden = self.decoder_hidden(
            note_ids, pad_mask, past_kv, deterministic=deterministic, dropout_rng=dropout_rng
        )
        return self.lm_head(hidden)
