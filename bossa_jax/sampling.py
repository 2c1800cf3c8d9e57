"""The jitted top-k sampler of stage 2 (SPEC 8.1; DESIGN "Sampling").

The official ``generate_nucleus2`` samples one sequence at a time in a Python loop and recomputes
the whole causal linear-attention product at every step (SPEC 4.5 "KV cache"). Here:

* the prompt (optionally behind stage 2's projected query vectors, SPEC 4.3) goes once through
  MuseCoco's parallel form, which returns the last valid position's logits and every layer's
  linear-attention state after the prompt (padded keys add nothing to it);
* then one jitted ``lax.while_loop`` of :meth:`MuseCoco.decode_step` (O(1) per token) over a
  fixed-shape carry: token buffer, per-layer state, step, done flags, stop counters; the step runs
  :meth:`MuseCoco.decoding_layers`, made once per sampler (unstacked blocks: a scan over stacked
  kernels copies each layer's kernels at every token, twice the memory traffic of a step that is
  memory-bound at batch 1; LoRA merged in fp32);
* each draw: the logits divided by the temperature, the ``top_k`` largest kept (``lax.top_k``), then
  optionally the smallest set of those with cumulative probability >= ``top_p`` (SPEC 8.1
  ``nucleus_filter``), and a categorical draw over what is left;
* stops per sequence, as the official code does: a drawn ``</s>`` stops without being appended;
  every drawn ``b-1`` counts a bar and the one that reaches ``bar_limit`` (official: 4) stops
  without being appended; ``max_new_tokens`` caps the rest;
* sequence i draws with the key ``fold_in(fold_in(key(seed), sequence_id[i]), step)``, so its tokens
  depend neither on the other sequences in the batch nor on the number of devices;
* prompts are right-padded to a few length buckets and the token buffer to a capacity bucket, so a
  new prompt length or ``max_new_tokens`` in the same buckets reuses the compiled program
  (``max_new_tokens``, ``bar_limit``, temperature, ``top_p``, the seed and the position start are
  traced; ``top_k``, the stop ids and the bucket sizes are static);
* the batch axis of every array in the carry is constrained to the ``batch`` rule
  (:func:`bossa_jax.sharding.constrain`), the decode state also by heads, as the model is sharded.

Optional, ours (not in the official code): a :class:`MelodyLock` keeps the lead sheet's melody.
When the sampler reaches a lead-sheet melody onset of the bar it is in, the piano instrument, the
melody pitch and its duration are forced; a draw that would pass the bar's next melody onset (a
later onset, ``b-1`` or ``</s>``) becomes that onset. Everything else (the accompaniment,
velocities, every other onset) is still drawn from the model.

One deliberate difference: the padding id (``<pad>``) is never drawn: it has no position and is
masked as a key, so a sequence cannot continue from it (a trained model gives it ~0 probability).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bossa_jax.errors import ConfigError, DataError
from bossa_jax.layers import LinearAttentionState, unstack
from bossa_jax.models.musecoco import MuseCoco
from bossa_jax.sharding import constrain, named_shardings

EOS_ID = 2  # `</s>` (SPEC 5.1, 8.1)
BAR_ID = 5  # `b-1`
OFFICIAL_BAR_LIMIT = 4  # SPEC 8.1: the 4th drawn b-1 stops
OFFICIAL_MAX_LENGTH = 2048  # SPEC 8.1: at most 2048 - prompt_len steps
MIN_BUCKET = 16
LARGE_BUCKET = 128

STOP_LENGTH, STOP_EOS, STOP_BARS = 0, 1, 2  # why a sequence ended (``Samples.stop_reason``)


def bucket_length(n: int) -> int:
    """The padded size for a length n: powers of two from 16 up to 128, then multiples of 128."""
    if n <= LARGE_BUCKET:
        return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return -(-n // LARGE_BUCKET) * LARGE_BUCKET


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What the compiled program depends on (static) plus the defaults of the traced settings.

    ``eos_id`` / ``bar_id`` None disable that stop rule (benchmarks force the length that way);
    ``bar_limit`` None or 0: no bar limit.
    """

    top_k: int = 15  # SPEC 8.1: the notebook's k (sheetsage_inference.py uses 5)
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0: no nucleus filter
    eos_id: int | None = EOS_ID
    bar_id: int | None = BAR_ID
    bar_limit: int | None = OFFICIAL_BAR_LIMIT

    def check(self, vocab_size: int) -> None:
        if not 1 <= self.top_k <= vocab_size:
            raise ConfigError(f"sampling top_k must be in 1..{vocab_size}, got {self.top_k}")
        if not self.temperature > 0:
            raise ConfigError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p must be in (0, 1], got {self.top_p}")


def filter_logits(
    logits: jax.Array, top_k: int, temperature: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """SPEC 8.1's filters on (..., vocab) fp32 logits: the ``top_k`` largest divided by the
    temperature, then (``top_p`` < 1) the smallest prefix of them, in descending order, whose
    probability sums to >= ``top_p``; the rest -inf. Returns (filtered (..., k), their ids)."""
    values, ids = jax.lax.top_k(logits, top_k)  # descending
    values = values / temperature
    probs = jax.nn.softmax(values, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep = (before < top_p) | (top_p >= 1.0)
    return jnp.where(keep, values, -jnp.inf), ids


def draw(
    keys: jax.Array, logits: jax.Array, top_k: int, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """One token per row: ``keys`` (B,) typed keys, ``logits`` (B, vocab) -> ids (B,) int32."""
    values, ids = filter_logits(logits, top_k, temperature, top_p)
    choice = jax.vmap(jax.random.categorical)(keys, values)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sequence_keys(seed: jax.Array, sequence_ids: jax.Array) -> jax.Array:
    """Per-sequence keys from (seed, sequence index): independent of batch and devices."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(sequence_ids)


def step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


@dataclasses.dataclass(frozen=True)
class MelodyLock:
    """Per-row melody tables for the lock (see the module docstring); built by
    :func:`bossa_jax.symbolic.remi.melody_table` (one window each).

    ``pitch`` / ``duration`` (B, bars, onsets) int32: the token id of the melody note's pitch and
    duration at (bar, onset position), -1 where the lead sheet has none; bar 0 is the window's
    first bar. ``first_bar`` (B,): the bar the first sampled token is in (the bars the prompt
    already carries). ``onset_id`` / ``instrument_id``: the ids of ``o-0`` and of the piano
    instrument ``i-0`` (static).
    """

    pitch: np.ndarray
    duration: np.ndarray
    first_bar: np.ndarray
    onset_id: int
    instrument_id: int

    def padded(self, batch: int) -> MelodyLock:
        """Rows added (no melody) up to ``batch``."""
        extra = batch - self.pitch.shape[0]
        if extra < 0:
            raise ValueError(f"melody lock has {self.pitch.shape[0]} rows for a batch of {batch}")
        none = np.full((extra, *self.pitch.shape[1:]), -1, np.int32)
        return dataclasses.replace(
            self,
            pitch=np.concatenate([self.pitch, none]).astype(np.int32),
            duration=np.concatenate([self.duration, none]).astype(np.int32),
            first_bar=np.concatenate([self.first_bar, np.zeros(extra)]).astype(np.int32),
        )


def _is_onset(token: jax.Array, onset_id: int, n_onsets: int) -> jax.Array:
    return (token >= onset_id) & (token < onset_id + n_onsets)


def _lock_mask(
    lock: dict[str, jax.Array], carry: dict[str, jax.Array], logits: jax.Array, ids: tuple
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The melody lock before a draw: (logits (B, vocab) with the forced id alone where the lock
    forces one, whether it forces a melody pitch (B,), the next melody onset to place (B,), or
    -1 when the bar has none left)."""
    onset_id, instrument_id, _, _ = ids
    n_bars, n_onsets = lock["pitch"].shape[1:]
    bar = lock["first_bar"] + carry["bars"]
    index = jnp.clip(bar, 0, n_bars - 1)[:, None, None]
    row = jnp.take_along_axis(lock["pitch"], index, 1)[:, 0]
    durations = jnp.take_along_axis(lock["duration"], index, 1)[:, 0]
    positions = jnp.arange(n_onsets)[None]
    pending = (row >= 0) & (positions > carry["lock_done"][:, None]) & (bar < n_bars)[:, None]
    next_onset = jnp.where(pending.any(-1), jnp.argmax(pending, -1), -1)
    prev = carry["lock_prev"]
    at_melody = (next_onset >= 0) & (carry["lock_onset"] == next_onset)
    force_instrument = at_melody & _is_onset(prev, onset_id, n_onsets)
    force_pitch = at_melody & (prev == instrument_id)
    onset = carry["lock_onset"][:, None].clip(0)
    forced_id = jnp.where(
        force_instrument,
        instrument_id,
        jnp.take_along_axis(jnp.where(force_pitch[:, None], row, durations), onset, 1)[:, 0],
    )
    force = force_instrument | force_pitch | carry["lock_forced_pitch"]
    vocab = jnp.arange(logits.shape[-1])[None]
    only = jnp.where(vocab == forced_id[:, None], logits, -jnp.inf)
    return jnp.where(force[:, None], only, logits), force_pitch, next_onset


def _lock_redirect(token: jax.Array, next_onset: jax.Array, ids: tuple, n: int) -> jax.Array:
    """A draw that would pass the next melody onset of the bar (a later onset, ``b-1`` or
    ``</s>``) becomes that onset."""
    onset_id, _, eos_id, bar_id = ids
    later = _is_onset(token, onset_id, n) & (token > onset_id + next_onset)
    skips = (next_onset >= 0) & (later | (token == bar_id) | (token == eos_id))
    return jnp.where(skips, onset_id + next_onset, token)


def _lock_update(
    carry: dict[str, jax.Array], token: jax.Array, forced_pitch: jax.Array, ids: tuple, n: int
) -> dict[str, jax.Array]:
    """The lock's state after ``token``: the current onset, the last melody onset placed in this
    bar, the previous token and whether it was a forced melody pitch."""
    onset_id, _, _, bar_id = ids
    new_bar = token == bar_id
    is_onset = _is_onset(token, onset_id, n)
    onset = jnp.where(is_onset, token - onset_id, jnp.where(new_bar, -1, carry["lock_onset"]))
    done = jnp.where(forced_pitch, carry["lock_onset"], carry["lock_done"])
    return dict(
        lock_onset=onset,
        lock_done=jnp.where(new_bar, -1, done),
        lock_prev=token,
        lock_forced_pitch=forced_pitch,
    )


def _constrain_state(states: list[LinearAttentionState]) -> list[LinearAttentionState]:
    """Each layer's decode state sharded by batch and heads."""
    return [
        LinearAttentionState(
            constrain(state.kv, "batch", "heads", None, None),
            constrain(state.k_sum, "batch", "heads", None),
        )
        for state in states
    ]


def prompt_logits_and_state(
    model: MuseCoco,
    tokens: jax.Array,
    lengths: jax.Array,
    prefix_embeddings: jax.Array | None,
    position_start: int | jax.Array,
) -> tuple[jax.Array, LinearAttentionState]:
    """The parallel form over right-padded prompts (B, L) of ``lengths`` (B,): the logits at each
    prompt's last token (B, vocab) and the state after its own tokens only (SPEC 4.3 layout)."""
    pad_mask = jnp.arange(tokens.shape[1])[None, :] >= lengths[:, None]
    logits, state = model(tokens, pad_mask, prefix_embeddings, position_start, return_state=True)
    offset = 0 if prefix_embeddings is None else prefix_embeddings.shape[1]
    last = (offset + lengths - 1)[:, None, None]
    return jnp.take_along_axis(logits, last, axis=1)[:, 0], state


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "layer_graphdef",
        "top_k",
        "capacity",
        "eos_id",
        "bar_id",
        "pad_id",
        "keep_logits",
        "lock_ids",
    ),
)
def _sample(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    layer_graphdef: nnx.GraphDef,
    layer_params: tuple[nnx.State, ...],
    tokens: jax.Array,
    lengths: jax.Array,
    prefix_embeddings: jax.Array | None,
    sequence_ids: jax.Array,
    seed: jax.Array,
    max_new_tokens: jax.Array,
    bar_limit: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    position_start: jax.Array,
    forced: jax.Array | None,
    lock: dict[str, jax.Array] | None,
    *,
    top_k: int,
    capacity: int,
    eos_id: int,
    bar_id: int,
    pad_id: int,
    keep_logits: bool,
    lock_ids: tuple[int, int] | None = None,
) -> dict[str, jax.Array]:
    """Prompt + while loop, compiled once per (graphdef, batch, buckets, static settings).
    ``layer_graphdef`` / ``layer_params``: the model's :meth:`~MuseCoco.decoding_layers`, split.

    ``forced`` (B, capacity): teacher forcing (tokens used instead of draws, stop rules still
    applied); ``keep_logits``: also return the logits each step drew from (B, capacity, vocab).
    ``lock``: a :class:`MelodyLock`'s arrays (``lock_ids``: its static ids).
    """
    model = nnx.merge(graphdef, params)
    layers = [nnx.merge(layer_graphdef, layer) for layer in layer_params]
    batch = tokens.shape[0]
    tokens = constrain(tokens, "batch", "length")
    logits, state = prompt_logits_and_state(
        model, tokens, lengths, prefix_embeddings, position_start
    )
    vocab_ban = jnp.zeros(logits.shape[-1], jnp.float32).at[pad_id].set(-jnp.inf)
    keys = sequence_keys(seed, sequence_ids)
    max_new_tokens = jnp.minimum(max_new_tokens, capacity)

    carry = dict(
        step=jnp.int32(0),
        logits=constrain(logits, "batch", "vocab"),
        state=_constrain_state(unstack(state)),
        generated=jnp.full((batch, capacity), pad_id, jnp.int32),
        count=jnp.zeros(batch, jnp.int32),
        bars=jnp.zeros(batch, jnp.int32),
        stop_reason=jnp.full(batch, STOP_LENGTH, jnp.int32),
        done=max_new_tokens <= 0,
    )
    if keep_logits:
        carry["step_logits"] = jnp.zeros((batch, capacity, logits.shape[-1]), jnp.float32)
    if lock is not None:
        ids = (*lock_ids, eos_id, bar_id)
        n_onsets = lock["pitch"].shape[2]
        carry.update(
            lock_onset=jnp.full(batch, -1, jnp.int32),
            lock_done=jnp.full(batch, -1, jnp.int32),
            lock_prev=jnp.full(batch, -1, jnp.int32),
            lock_forced_pitch=jnp.zeros(batch, bool),
        )

    def cond(c: dict[str, jax.Array]) -> jax.Array:
        return (c["step"] < capacity) & ~jnp.all(c["done"])

    def body(c: dict[str, jax.Array]) -> dict[str, jax.Array]:
        step, done = c["step"], c["done"]
        logits = c["logits"] + vocab_ban
        if lock is not None:
            logits, forced_pitch, next_onset = _lock_mask(lock, c, logits, ids)
        if forced is None:
            token = draw(step_keys(keys, step), logits, top_k, temperature, top_p)
            if lock is not None:
                token = _lock_redirect(token, next_onset, ids, n_onsets)
        else:
            token = forced[:, step]
        is_eos = token == eos_id if eos_id >= 0 else jnp.zeros_like(done)
        bars = c["bars"] + ((token == bar_id) & ~done if bar_id >= 0 else 0)
        is_last_bar = (token == bar_id) & (bar_limit > 0) & (bars >= bar_limit)
        stopped = ~done & (is_eos | is_last_bar)
        append = ~done & ~stopped
        generated = c["generated"].at[:, step].set(jnp.where(append, token, pad_id))
        count = c["count"] + append
        reason = jnp.where(stopped, jnp.where(is_eos, STOP_EOS, STOP_BARS), c["stop_reason"])
        # every row advances in lockstep: an active row's new token sits at prompt_len + step
        next_logits, state = model.decode_step(
            token, c["state"], lengths + step, position_start, layers
        )
        out = dict(
            step=step + 1,
            logits=constrain(next_logits, "batch", "vocab"),
            state=_constrain_state(state),
            generated=constrain(generated, "batch", None),
            count=count,
            bars=bars,
            stop_reason=reason,
            done=done | stopped | (count >= max_new_tokens),
        )
        if keep_logits:
            out["step_logits"] = c["step_logits"].at[:, step].set(c["logits"])
        if lock is not None:
            out.update(_lock_update(c, token, forced_pitch & ~done, ids, n_onsets))
        return out

    carry = jax.lax.while_loop(cond, body, carry)
    result = {k: carry[k] for k in ("generated", "count", "stop_reason")}
    if keep_logits:
        result["step_logits"] = carry["step_logits"]
    return result


@dataclasses.dataclass
class Samples:
    """What :meth:`Sampler.__call__` returns (host numpy arrays)."""

    prompts: list[np.ndarray]
    generated: np.ndarray  # (B, capacity) int32, the padding id after each row's count
    count: np.ndarray  # (B,) tokens generated per sequence (the stopping token not counted)
    stop_reason: np.ndarray  # (B,) STOP_LENGTH, STOP_EOS or STOP_BARS
    step_logits: np.ndarray | None = None  # (B, capacity, vocab) with ``keep_logits``

    def new_tokens(self, i: int) -> np.ndarray:
        return self.generated[i, : self.count[i]]

    def sequences(self) -> list[np.ndarray]:
        """Prompt + generated ids per sequence, as ``generate_nucleus2`` returns them."""
        return [np.concatenate([p, self.new_tokens(i)]) for i, p in enumerate(self.prompts)]


class Sampler:
    """Samples continuations of a batch of prompts with one MuseCoco (split once, DESIGN idioms).

    ``sampler(prompts, max_new_tokens=..., seed=...)``: ``prompts`` a list of 1-D id sequences of
    any lengths; ``prefix_embeddings`` (B, P, d) optional, put before the tokens with no scale or
    position (SPEC 4.3); ``position_start``: the index of the first token with a position (stage 2:
    61). Call inside :func:`bossa_jax.sharding.use_mesh` to shard the batch over the mesh.
    """

    def __init__(
        self,
        model: MuseCoco,
        settings: SamplingSettings | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """``mesh``: place the parameters as the rules shard them (call inside
        :func:`bossa_jax.sharding.use_mesh`); not needed for a model made by ``create_sharded``."""
        self.cfg = model.cfg
        self.settings = settings or SamplingSettings()
        self.settings.check(self.cfg.vocab_size)
        self.graphdef, self.params = nnx.split(model)
        if mesh is not None:
            self.params = jax.device_put(self.params, named_shardings(self.params, mesh))
        # made once here (eagerly, from the placed parameters): a second copy of the blocks'
        # kernels, so that no sampler call copies them again
        layers = nnx.merge(self.graphdef, self.params).decoding_layers()
        self.layer_graphdef = nnx.graphdef(layers[0])
        self.layer_params = tuple(nnx.state(layer) for layer in layers)

    @staticmethod
    def compiled_programs() -> int:
        """How many programs the sampler has compiled in this process (recompilation checks)."""
        return _sample._cache_size()

    def pad_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads prompts with the padding id to the bucket of the longest: (B, L), (B,)."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        if len(prompts) == 0 or lengths.min() < 1:
            raise DataError("every prompt needs at least one token (the official BOS `</s>`)")
        padded = np.full((len(prompts), bucket_length(int(lengths.max()))), self.cfg.padding_idx)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = np.asarray(p)
        return padded.astype(np.int32), lengths

    def __call__(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        seed: int = 0,
        sequence_ids: Sequence[int] | None = None,
        prefix_embeddings: jax.Array | None = None,
        position_start: int = 0,
        bar_limit: int | Sequence[int] | None = -1,
        forced_tokens: np.ndarray | None = None,
        keep_logits: bool = False,
        melody_lock: MelodyLock | None = None,
    ) -> Samples:
        """``max_new_tokens`` default: the official cap, 2048 - prompt length per sequence;
        ``bar_limit`` default: the settings' (-1), None: no limit; ``sequence_ids`` default
        0..B-1 (give global indices when a long list is cut into batches)."""
        s, cfg = self.settings, self.cfg
        tokens, lengths = self.pad_prompts(prompts)
        batch = len(prompts)
        if max_new_tokens is None:
            max_new_tokens = np.maximum(OFFICIAL_MAX_LENGTH - lengths, 0)
        max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (batch,))
        if bar_limit == -1:
            bar_limit = s.bar_limit
        bars = np.broadcast_to(np.asarray(bar_limit or 0, np.int32), (batch,))
        too_long = lengths + max_new > cfg.max_positions
        if too_long.any():
            i = int(np.argmax(too_long))
            raise DataError(
                f"prompt {i}: {lengths[i]} tokens + max_new_tokens {max_new[i]} exceed the "
                f"model's max_positions ({cfg.max_positions}); lower max_new_tokens"
            )
        capacity = bucket_length(max(int(max_new.max()), 1))
        if forced_tokens is not None:
            forced = np.full((batch, capacity), cfg.padding_idx, np.int32)
            forced[:, : forced_tokens.shape[1]] = forced_tokens[:, :capacity]
            forced_tokens = forced
        ids = np.arange(batch) if sequence_ids is None else np.asarray(sequence_ids)
        lock = lock_ids = None
        if melody_lock is not None:
            melody_lock = melody_lock.padded(batch)
            lock = {k: getattr(melody_lock, k) for k in ("pitch", "duration", "first_bar")}
            lock_ids = (melody_lock.onset_id, melody_lock.instrument_id)
        out = _sample(
            self.graphdef,
            self.params,
            self.layer_graphdef,
            self.layer_params,
            tokens,
            lengths,
            prefix_embeddings,
            ids.astype(np.int32),
            np.uint32(seed),
            max_new,
            bars,
            np.float32(s.temperature),
            np.float32(s.top_p),
            np.int32(position_start),
            forced_tokens,
            lock,
            top_k=s.top_k,
            capacity=capacity,
            eos_id=-1 if s.eos_id is None else s.eos_id,
            bar_id=-1 if s.bar_id is None else s.bar_id,
            pad_id=cfg.padding_idx,
            keep_logits=keep_logits,
            lock_ids=lock_ids,
        )
        out = jax.device_get(out)
        return Samples(
            prompts=[np.asarray(p, np.int32) for p in prompts],
            generated=out["generated"],
            count=out["count"],
            stop_reason=out["stop_reason"],
            step_logits=out.get("step_logits"),
        )
