"""The jitted sampler (SPEC 8.1, issue 10 item 1) against a naive loop that re-runs MuseCoco's
parallel form on the whole prefix at every step, as the official ``generate_nucleus2`` does (its
"cache" recomputes the full causal product, SPEC 4.5): same logits at every step under teacher
forcing, same tokens and stops under sampling; per-sequence stops; 1 vs 8 devices; no recompile
for a new prompt length in the same bucket. Tiny config, fp32, random weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bossa_jax import sampling, sharding
from bossa_jax.config import load_config
from bossa_jax.models.musecoco import MuseCoco
from bossa_jax.sampling import (
    BAR_ID,
    EOS_ID,
    STOP_BARS,
    STOP_EOS,
    STOP_LENGTH,
    Sampler,
    SamplingSettings,
)
from bossa_jax.symbolic import remi

CFG = load_config("configs/tiny.yaml").musecoco  # 64 wide, 3 heads, 2 layers, fp32
PAD = CFG.padding_idx
NAIVE_LENGTH = 64  # the naive loop's fixed buffer (one compile; the causal mask hides the rest)
POS_START = 3


def make_model(eos_bias: float = 0.0, bar_bias: float = 0.0) -> MuseCoco:
    """Random tiny MuseCoco with non-zero LoRA; the biases push the final LayerNorm bias along the
    `</s>` and `b-1` head columns so that draws stop within a few dozen steps."""
    model = sharding.create_sharded(lambda: MuseCoco(CFG, rngs=nnx.Rngs(0)))
    adapters = nnx.state(model, nnx.LoRAParam)  # B is zero at init: make every adapter count
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(adapters))))
    nnx.update(
        model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapters)
    )
    head = model.lm_head.kernel[...]
    direction = eos_bias * head[:, EOS_ID] / jnp.linalg.norm(head[:, EOS_ID])
    direction += bar_bias * head[:, BAR_ID] / jnp.linalg.norm(head[:, BAR_ID])
    model.layer_norm.bias[...] = model.layer_norm.bias[...] + direction
    return model


@pytest.fixture(scope="module")
def model() -> MuseCoco:
    return make_model()


@pytest.fixture(scope="module")
def stop_prone_model() -> MuseCoco:
    return make_model(eos_bias=2.0, bar_bias=4.5)


def prompts(lengths, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[EOS_ID], rng.integers(6, CFG.vocab_size, n - 1)]) for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def _naive_logits(graphdef, params, tokens, length, prefix, start):
    """The full parallel form over a prefix of ``length`` tokens; the logits of its last one."""
    pad_mask = jnp.arange(tokens.shape[1])[None] >= length
    logits = nnx.merge(graphdef, params)(tokens, pad_mask, prefix, start)
    offset = 0 if prefix is None else prefix.shape[1]
    return logits[0, offset + length - 1]


def naive_loop(model, prompt, *, settings, seed, index, max_new, prefix=None, forced=None):
    """The official loop at batch 1: recompute the whole prefix each step, draw with the sampler's
    per-sequence key, stop as SPEC 8.1. Returns (new tokens, stop reason, logits per step)."""
    graphdef, params = nnx.split(model)
    keys = sampling.sequence_keys(jnp.uint32(seed), jnp.array([index]))
    sequence, logits_seen, bars = list(prompt), [], 0
    for step in range(max_new):
        tokens = np.full((1, NAIVE_LENGTH), PAD, np.int32)
        tokens[0, : len(sequence)] = sequence
        logits = _naive_logits(graphdef, params, tokens, len(sequence), prefix, POS_START)
        logits_seen.append(np.asarray(logits))
        if forced is not None:
            token = int(forced[step])
        else:
            banned = logits.at[PAD].set(-jnp.inf)[None]
            token = int(
                sampling.draw(
                    sampling.step_keys(keys, jnp.int32(step)),
                    banned,
                    settings.top_k,
                    jnp.float32(settings.temperature),
                    jnp.float32(settings.top_p),
                )[0]
            )
        if token == EOS_ID:
            return sequence[len(prompt) :], STOP_EOS, logits_seen
        if token == BAR_ID:
            bars += 1
            if bars == settings.bar_limit:
                return sequence[len(prompt) :], STOP_BARS, logits_seen
        sequence.append(token)
    return sequence[len(prompt) :], STOP_LENGTH, logits_seen


def test_filter_logits_matches_a_numpy_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    k, t, p = 10, 0.7, 0.8
    values, ids = sampling.filter_logits(jnp.asarray(logits), k, jnp.float32(t), jnp.float32(p))
    for row, v, i in zip(logits, np.asarray(values), np.asarray(ids)):
        order = np.argsort(-row)[:k]
        np.testing.assert_array_equal(i, order)
        scaled = row[order] / t
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        size = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest set with sum >= p
        np.testing.assert_allclose(v[:size], scaled[:size], rtol=1e-6)
        assert np.all(np.isneginf(v[size:])) and size < k
    unfiltered, _ = sampling.filter_logits(jnp.asarray(logits), k, jnp.float32(t), jnp.float32(1))
    assert np.isfinite(np.asarray(unfiltered)).all()


def test_teacher_forced_logits_equal_the_full_recompute_at_every_step(model):
    """Prompts of 3 lengths behind prefix embeddings; the loop's logits at every step vs the
    parallel form re-run on the whole prefix (<= 1e-5, fp32)."""
    lengths, steps = (4, 9, 13), 12
    rng = np.random.default_rng(1)
    forced = rng.integers(6, CFG.vocab_size, (3, steps)).astype(np.int32)
    prefix = rng.standard_normal((3, 2, CFG.hidden_size)).astype(np.float32)
    ps = prompts(lengths)
    out = Sampler(model)(
        ps,
        max_new_tokens=steps,
        prefix_embeddings=jnp.asarray(prefix),
        position_start=POS_START,
        forced_tokens=forced,
        keep_logits=True,
    )
    np.testing.assert_array_equal(out.count, steps)
    for i, p in enumerate(ps):
        np.testing.assert_array_equal(out.new_tokens(i), forced[i])
        _, _, naive = naive_loop(
            model,
            p,
            settings=SamplingSettings(),
            seed=0,
            index=i,
            max_new=steps,
            prefix=prefix[i : i + 1],
            forced=forced[i],
        )
        np.testing.assert_allclose(out.step_logits[i, :steps], np.stack(naive), atol=1e-5, rtol=0)


def test_sampled_tokens_and_stops_equal_the_naive_loop(stop_prone_model):
    """Same seed, same tokens; each sequence stops on its own (`</s>`, the 4th `b-1`, or length)."""
    settings = SamplingSettings(top_k=15, temperature=0.9, top_p=0.95)
    ps = prompts((3, 7, 12, 5, 9))
    out = Sampler(stop_prone_model, settings)(
        ps, max_new_tokens=40, seed=7, position_start=POS_START
    )
    for i, p in enumerate(ps):
        tokens, reason, _ = naive_loop(
            stop_prone_model, p, settings=settings, seed=7, index=i, max_new=40
        )
        np.testing.assert_array_equal(out.new_tokens(i), tokens)
        assert out.stop_reason[i] == reason
        assert np.all(out.generated[i, out.count[i] :] == PAD)
    # the batch exercises both stop rules at different steps, and rows that go on after them
    assert {STOP_EOS, STOP_BARS} <= set(out.stop_reason.tolist())
    assert len(set(out.count.tolist())) > 2
    for i in np.flatnonzero(out.stop_reason == STOP_BARS):
        assert np.sum(out.new_tokens(i) == BAR_ID) == settings.bar_limit - 1


def test_forced_stops_are_per_sequence_and_the_bar_limit_is_a_parameter(model):
    forced = np.full((4, 10), 9, np.int32)
    forced[0, 2] = EOS_ID  # stops at step 2, `</s>` not appended
    forced[1, [1, 3, 5, 7]] = BAR_ID  # the 4th b-1 (step 7) stops, not appended
    forced[2, [1, 3, 5, 7]] = BAR_ID  # same tokens, but a bar limit of 2 stops at step 3
    sampler = Sampler(model)
    out = sampler(
        prompts((3, 4, 5, 6)), max_new_tokens=10, forced_tokens=forced, bar_limit=[4, 4, 2, 4]
    )
    np.testing.assert_array_equal(out.count, [2, 7, 3, 10])
    np.testing.assert_array_equal(out.stop_reason, [STOP_EOS, STOP_BARS, STOP_BARS, STOP_LENGTH])
    np.testing.assert_array_equal(out.new_tokens(1), forced[1, :7])
    np.testing.assert_array_equal(out.new_tokens(3), forced[3])
    no_limit = sampler(prompts((4,)), max_new_tokens=10, forced_tokens=forced[1:2], bar_limit=None)
    assert no_limit.count[0] == 10 and no_limit.stop_reason[0] == STOP_LENGTH


def test_same_tokens_on_one_and_eight_devices_and_in_any_batch(model):
    assert jax.device_count() == 8
    settings = SamplingSettings(eos_id=None, bar_id=None)
    ps = prompts((3, 5, 8, 2, 6, 4, 7, 9), seed=3)
    single = Sampler(model, settings)(ps, max_new_tokens=12, seed=11)
    cfg = load_config(None)
    mesh = sharding.make_mesh(cfg.mesh)
    assert dict(mesh.shape)["data"] == 8
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        sharded = Sampler(model, settings, mesh=mesh)(ps, max_new_tokens=12, seed=11)
    np.testing.assert_array_equal(sharded.generated, single.generated)
    # a sequence's draws depend on (seed, its index), not on the rest of the batch
    subset = Sampler(model, settings)(
        [ps[5], ps[2]], max_new_tokens=12, seed=11, sequence_ids=[5, 2]
    )
    np.testing.assert_array_equal(subset.generated, single.generated[[5, 2]])
    other_seed = Sampler(model, settings)(ps, max_new_tokens=12, seed=12)
    assert not np.array_equal(other_seed.generated, single.generated)


def test_new_lengths_in_the_same_buckets_do_not_recompile(model):
    sampler = Sampler(model)
    sampler(prompts((5, 9)), max_new_tokens=20, seed=0)
    compiled = Sampler.compiled_programs()
    sampler(prompts((11, 3)), max_new_tokens=17, seed=1, bar_limit=3)  # same buckets (16, 32)
    assert Sampler.compiled_programs() == compiled
    sampler(prompts((20, 3)), max_new_tokens=17, seed=1)  # prompt bucket 32: one new program
    assert Sampler.compiled_programs() == compiled + 1


def test_bucket_lengths():
    assert [sampling.bucket_length(n) for n in (1, 16, 17, 100, 128, 129, 1000)] == [
        16,
        16,
        32,
        128,
        128,
        256,
        1024,
    ]


# --- the melody lock (ours, arrange.melody_lock) ----------------------------------------------
def scripted_preference(prev: str, onset: int) -> str:
    """A stand-in model that plays only its own accompaniment: p-48 at onsets 0 and 24 of every
    bar, never a melody note."""
    if prev in ("", "b-1"):
        return "s-9"
    if prev.startswith("s-"):
        return "t-36"
    if prev.startswith(("t-", "v-")):
        later = [o for o in (0, 24) if o > onset]
        return f"o-{later[0]}" if later else "b-1"
    return {"o": "i-0", "i": "p-48", "p": "d-5", "d": "v-20"}[prev.split("-")[0]]


def test_melody_lock_places_every_melody_note_and_leaves_the_rest_to_the_model():
    vocab = remi.VOCAB
    rows = [  # (bar, position, instrument, pitch, duration); bars 3.. of a longer lead sheet
        (3, 0, 0, 72, 11), (3, 12, 0, 60, 5), (3, 12, 0, 74, 5), (3, 36, 0, 76, 5),
        (3, 0, 4, 52, 27), (4, 6, 0, 70, 5), (9, 0, 0, 65, 5),
    ]  # fmt: skip
    events = np.array([(*r, 20, 9, 36) for r in rows], np.int64)
    pitch, duration = remi.melody_table(events, 3, 4)
    assert pitch.shape == (4, remi.SIZE["o"]) and (pitch >= 0).sum() == 4  # the chord is no melody
    assert pitch[0, 12] == vocab["p-74"] and duration[1, 6] == vocab["d-5"]  # the highest kept
    lock = {"pitch": jnp.asarray(pitch[None]), "duration": jnp.asarray(duration[None])}
    lock["first_bar"] = jnp.zeros(1, jnp.int32)
    ids = (remi.OFFSET["o"], remi.OFFSET["i"], EOS_ID, BAR_ID)
    carry = dict(
        bars=jnp.zeros(1, jnp.int32), lock_onset=jnp.full(1, -1), lock_done=jnp.full(1, -1),
        lock_prev=jnp.full(1, -1), lock_forced_pitch=jnp.zeros(1, bool),
    )  # fmt: skip
    onsets = np.arange(remi.SIZE["o"])
    stream, onset = [], -1
    while stream.count("b-1") < 2 and len(stream) < 200:
        logits = np.zeros(remi.VOCAB_SIZE, np.float32)
        logits[vocab[scripted_preference(stream[-1] if stream else "", onset)]] = 10.0
        masked, forced_pitch, next_onset = sampling._lock_mask(
            lock, carry, jnp.asarray(logits)[None], ids
        )
        token = sampling._lock_redirect(jnp.argmax(masked, -1), next_onset, ids, len(onsets))
        token = int(token[0])
        text = remi.TOKENS[token]
        onset = int(text[2:]) if text.startswith("o-") else (-1 if text == "b-1" else onset)
        stream.append(text)
        carry.update(
            sampling._lock_update(carry, jnp.array([token]), forced_pitch, ids, len(onsets))
        )
        carry["bars"] = carry["bars"] + (token == BAR_ID)
    notes = {tuple(r) for r in remi.decode(stream)[0][:, [0, 1, 3, 4]].tolist()}
    melody = {(0, 0, 72, 11), (0, 12, 74, 5), (0, 36, 76, 5), (1, 6, 70, 5)}
    assert melody <= notes  # every melody note at its bar, onset, pitch and duration
    assert {(0, 24, 48, 5), (1, 0, 48, 5), (1, 24, 48, 5)} <= notes  # the model's own notes
    assert len(notes) == 7 and stream.count("b-1") == 2


def test_melody_lock_in_the_compiled_sampler_per_row_and_on_eight_devices(model):
    vocab = remi.VOCAB
    pitch = np.full((3, 2, remi.SIZE["o"]), -1, np.int32)
    duration = np.full_like(pitch, -1)
    pitch[:, 0, [0, 12]] = vocab["p-60"], vocab["p-64"]  # rows 0-2: bar 0, onsets 0 and 12
    duration[:, 0, [0, 12]] = vocab["d-5"]
    pitch[2] = -1  # row 2: no melody
    first_bar = np.array([0, 1, 0])  # row 1 starts in bar 1, past its melody

    def lock(rows):
        return sampling.MelodyLock(
            pitch[rows], duration[rows], first_bar[rows], remi.OFFSET["o"], remi.OFFSET["i"]
        )

    settings = SamplingSettings(bar_limit=None)
    ps = prompts((4, 6, 5), seed=5)
    locked = Sampler(model, settings)(ps, max_new_tokens=200, seed=2, melody_lock=lock([0, 1, 2]))
    free = Sampler(model, settings)(ps, max_new_tokens=200, seed=2)
    text = " ".join(remi.to_strings(locked.new_tokens(0)))
    first_bar_text = text.split("b-1")[0]
    assert "o-0 i-0 p-60 d-5" in first_bar_text and "o-12 i-0 p-64 d-5" in first_bar_text
    for row in (1, 2):  # nothing to place: the model's own tokens
        np.testing.assert_array_equal(locked.new_tokens(row), free.new_tokens(row))
    alone = Sampler(model, settings)(
        [ps[0]], max_new_tokens=200, seed=2, sequence_ids=[0], melody_lock=lock([0])
    )
    np.testing.assert_array_equal(alone.new_tokens(0), locked.new_tokens(0))
    cfg = load_config(None)
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        sharded = Sampler(model, settings, mesh=mesh)(
            (ps * 3)[:8], max_new_tokens=200, seed=2, sequence_ids=[0, 1, 2] * 2 + [0, 1],
            melody_lock=lock([0, 1, 2, 0, 1, 2, 0, 1]),
        )  # fmt: skip
    np.testing.assert_array_equal(sharded.generated[:3], locked.generated)
