"""Stage-1 losses as pure functions over arrays (SPEC 3; DESIGN "Batches are global").

* ITC (SPEC 3.2): similarity of audio i and symbolic j = max over the queries of the dot product of
  unit vectors, divided by the learnable temperature; symmetric cross-entropy with label smoothing
  0.1 and targets on the diagonal.
* ITM hard negatives (SPEC 3.3): the two temperature-scaled similarity matrices with the diagonal
  set to -10000, row softmax, one categorical draw per row. The indices are returned so a test can
  feed the same negatives to the torch reference.
* ITM loss: CE (no smoothing) of the query-averaged 2-way logits, labels [1]*B + [0]*2B.
* ITG (SPEC 3.4): [DEC] substitution, labels, shift by one note (8 ids), CE over the 1237 output
  classes with label smoothing 0.1, per-field weights. ``field_mean="official"`` divides each
  field's summed loss by all B*(N-1) note slots, ignored ones included (SPEC 10.13: the loss scale
  then depends on padding and lead-sheet length); the default ``"valid"`` divides by the number of
  valid targets of that field.

Every function sees the global batch: inside a jitted step over a sharded batch GSPMD inserts the
gathers the official code writes by hand (SPEC 11.7), so there is no all-gather here. Losses are
computed in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

LABEL_SMOOTHING = 0.1
IGNORE_INDEX = -100
NOTE_WIDTH = 8  # ids per octuple note
MASKED_SIMILARITY = -10000.0  # the official fill value for the positives before the softmax
# bar, position, instrument, pitch, duration, velocity, time signature, tempo (SPEC 3.4)
ITG_FIELD_WEIGHTS = (0.25, 0.25, 0.05, 0.25, 0.1, 0.05, 0.025, 0.025)
FIELD_NAMES = ("bar", "pos", "inst", "pitch", "dur", "vel", "ts", "tempo")
FieldMean = Literal["valid", "official"]


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Per-example CE over the last axis with torch's label smoothing: the target distribution is
    (1 - eps) * onehot + eps / C. Examples whose label is ``ignore_index`` get 0 (torch's
    ``reduction="none"``). Returns fp32 of ``labels.shape``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    loss = (
        nll
        if label_smoothing == 0.0
        else ((1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1))
    )
    return jnp.where(valid, loss, 0.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch ``F.normalize(x, dim=-1)``: x / max(||x||, eps), in fp32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def similarity(
    audio_feats: jax.Array, symbo_feats: jax.Array, temp: jax.Array | float = 1.0
) -> jax.Array:
    """a->s similarity (B_audio, B_symbo): max over queries of <audio[i, q], symbo[j]> / temp.

    ``audio_feats`` (B, Q, D) and ``symbo_feats`` (B, D) are unit vectors. The s->a matrix of the
    official code takes the max over the same products, so it is the transpose of this one.
    ``temp=1`` gives the retrieval ranking score (SPEC 3.7).
    """
    per_query = jnp.einsum(
        "iqd,jd->ijq", audio_feats.astype(jnp.float32), symbo_feats.astype(jnp.float32)
    )
    return jnp.max(per_query, axis=-1) / jnp.asarray(temp, jnp.float32)


def itc_loss(
    sim_a2s: jax.Array, sim_s2a: jax.Array, *, label_smoothing: float = LABEL_SMOOTHING
) -> jax.Array:
    """½[CE(a->s) + CE(s->a)] with targets arange(B) and label smoothing (SPEC 3.2)."""
    targets = jnp.arange(sim_a2s.shape[0])
    a2s = cross_entropy(sim_a2s, targets, label_smoothing=label_smoothing)
    s2a = cross_entropy(sim_s2a, targets, label_smoothing=label_smoothing)
    return 0.5 * (jnp.mean(a2s) + jnp.mean(s2a))


def hard_negative_weights(sim_a2s: jax.Array, sim_s2a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-softmax sampling weights with the positives masked (SPEC 3.3), without gradient.

    Returns (weights_a2s, weights_s2a): row i of ``weights_a2s`` is the distribution of the negative
    symbolic sample for audio i; row i of ``weights_s2a`` that of the negative audio for symbolic
    i. The diagonal holds -10000 before the softmax, so the positive has probability 0 (exactly, in
    fp32, for any temperature the logits can reach)."""
    eye = jnp.eye(sim_a2s.shape[0], dtype=bool)

    def weights(sim: jax.Array) -> jax.Array:
        sim = jax.lax.stop_gradient(sim.astype(jnp.float32))
        return jax.nn.softmax(jnp.where(eye, MASKED_SIMILARITY, sim), axis=-1)

    return weights(sim_a2s), weights(sim_s2a)


def sample_hard_negatives(
    rng: jax.Array, sim_a2s: jax.Array, sim_s2a: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One draw per row from :func:`hard_negative_weights` (``torch.multinomial(w, 1)`` per row).

    Returns (neg_symbo_idx, neg_audio_idx), both (B,) int32: ``neg_symbo_idx[i]`` is the symbolic
    sample paired with audio i, ``neg_audio_idx[i]`` the audio paired with symbolic i.
    """
    weights_a2s, weights_s2a = hard_negative_weights(sim_a2s, sim_s2a)
    key_symbo, key_audio = jax.random.split(rng)
    # log(0) = -inf: a zero-weight column (the positive) can never win the Gumbel argmax
    neg_symbo_idx = jax.random.categorical(key_symbo, jnp.log(weights_a2s), axis=-1)
    neg_audio_idx = jax.random.categorical(key_audio, jnp.log(weights_s2a), axis=-1)
    return neg_symbo_idx.astype(jnp.int32), neg_audio_idx.astype(jnp.int32)


def itm_labels(batch: int) -> jax.Array:
    """[1]*B (positive pairs) + [0]*2B (audio negatives, then symbolic negatives)."""
    return jnp.concatenate([jnp.ones((batch,), jnp.int32), jnp.zeros((2 * batch,), jnp.int32)])


def itm_loss(match_logits: jax.Array) -> jax.Array:
    """Plain CE of the matching logits (3B, 2), or (3B, Q, 2) averaged over the queries first."""
    if match_logits.ndim == 3:
        match_logits = jnp.mean(match_logits.astype(jnp.float32), axis=1)
    labels = itm_labels(match_logits.shape[0] // 3)
    return jnp.mean(cross_entropy(match_logits, labels))


def itg_inputs(
    notes: jax.Array, leadsheet_mask: jax.Array, pad_mask: jax.Array, *, dec_token_id: int
) -> tuple[jax.Array, jax.Array]:
    """(decoder input ids, labels) for ITG, both (B, 8N) (SPEC 3.4).

    Input ids: every ``<s>`` (id 0, only the SOS octuple) becomes [DEC]. Labels: the input ids, with
    -100 on lead-sheet and pad notes (``leadsheet_mask * pad_mask == 0``) and on the [DEC] octuple.
    """
    input_ids = jnp.where(notes == 0, dec_token_id, notes)
    arrangement = jnp.repeat((leadsheet_mask * pad_mask) != 0, NOTE_WIDTH, axis=-1)
    labels = jnp.where(arrangement & (input_ids != dec_token_id), input_ids, IGNORE_INDEX)
    return input_ids, labels.astype(jnp.int32)


def itg_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    field_mean: FieldMean = "valid",
    field_weights: tuple[float, ...] = ITG_FIELD_WEIGHTS,
    label_smoothing: float = LABEL_SMOOTHING,
    shifted: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Weighted per-field LM loss (SPEC 3.4). Returns (loss, per-field losses (8,)).

    ``logits`` (B, 8N, C) of the note stream, ``labels`` (B, 8N) from :func:`itg_inputs`. The
    logits of note i (slot j) predict field j of note i+1. ``field_mean``: ``"valid"`` (default)
    divides each field's summed loss by its number of valid targets; ``"official"`` by all
    B*(N-1) note slots as the released checkpoints were trained (SPEC 10.13). ``shifted``:
    ``logits`` are (B, 8(N-1), C), those of notes 0..N-2 only (the last note's are never used,
    so a caller can skip computing them).
    """
    if field_mean not in ("valid", "official"):
        raise ValueError(f"field_mean must be 'valid' or 'official', got {field_mean!r}")
    shifted_logits = logits if shifted else logits[:, :-NOTE_WIDTH]
    targets = labels[:, NOTE_WIDTH:]
    per_token = cross_entropy(shifted_logits, targets, label_smoothing=label_smoothing)
    per_token = per_token.reshape(-1, NOTE_WIDTH)  # (B*(N-1), 8): column j = field j
    summed = jnp.sum(per_token, axis=0)
    if field_mean == "official":
        per_field = summed / per_token.shape[0]
    else:
        count = jnp.sum((targets != IGNORE_INDEX).reshape(-1, NOTE_WIDTH), axis=0)
        per_field = summed / jnp.maximum(count, 1).astype(jnp.float32)
    weights = jnp.asarray(field_weights, jnp.float32)
    return jnp.sum(per_field * weights) / jnp.sum(weights), per_field
