"""Stage-1 losses (bossa_jax/models/losses.py) against the plain-torch reference of SPEC 3."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bossa_jax.models import losses
from tests.reference import losses_torch as ref

TOL = 1e-4


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


def test_cross_entropy_matches_torch_with_smoothing_and_ignore():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 11)).astype(np.float32) * 3
    labels = np.array([0, 3, -100, 10, 5, -100])
    for eps in (0.0, 0.1):
        got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps)
        want = torch.nn.functional.cross_entropy(
            _t(logits), _t(labels), label_smoothing=eps, reduction="none"
        )
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=0)
        assert np.all(np.asarray(got)[labels == -100] == 0.0)


def test_itc_matches_torch():
    rng = np.random.default_rng(1)
    audio, symbo = _unit(rng, 5, 4, 16), _unit(rng, 5, 16)
    temp = 0.07
    sim = losses.similarity(jnp.asarray(audio), jnp.asarray(symbo), temp)
    got = losses.itc_loss(sim, sim.T)
    want, sim_i2t, sim_t2i = ref.itc(_t(audio), _t(symbo), torch.tensor(temp))
    np.testing.assert_allclose(np.asarray(sim), sim_i2t.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(sim.T), sim_t2i.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(float(got), want.item(), atol=TOL, rtol=0)


def test_hard_negative_weights_match_torch_and_exclude_the_positive():
    rng = np.random.default_rng(2)
    audio, symbo = _unit(rng, 6, 4, 16), _unit(rng, 6, 16)
    sim = losses.similarity(jnp.asarray(audio), jnp.asarray(symbo), 0.07)
    w_a2s, w_s2a = losses.hard_negative_weights(sim, sim.T)
    _, sim_i2t, sim_t2i = ref.itc(_t(audio), _t(symbo), torch.tensor(0.07))
    want_i2t, want_t2i = ref.hard_negative_weights(sim_i2t, sim_t2i)
    np.testing.assert_allclose(np.asarray(w_a2s), want_i2t.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(w_s2a), want_t2i.numpy(), atol=TOL, rtol=0)
    assert np.all(np.diag(np.asarray(w_a2s)) == 0.0)
    assert np.all(np.diag(np.asarray(w_s2a)) == 0.0)
    np.testing.assert_allclose(np.asarray(w_a2s).sum(-1), 1.0, atol=1e-6)


def test_sampler_never_draws_the_positive_and_follows_the_softmax():
    """10000 draws with fixed keys: the diagonal is never drawn and the empirical frequencies of
    each row match its softmax weights (within 5 binomial standard deviations)."""
    rng = np.random.default_rng(3)
    batch, draws = 6, 10000
    audio, symbo = _unit(rng, batch, 4, 8), _unit(rng, batch, 8)
    # temperature 0.5 keeps every off-diagonal weight large enough to be seen
    sim = losses.similarity(jnp.asarray(audio), jnp.asarray(symbo), 0.5)
    keys = jax.random.split(jax.random.key(0), draws)
    neg_symbo, neg_audio = jax.jit(jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, sim.T)))(
        keys
    )
    neg_symbo, neg_audio = np.asarray(neg_symbo), np.asarray(neg_audio)
    rows = np.arange(batch)
    assert not np.any(neg_symbo == rows), "a positive was drawn as symbolic negative"
    assert not np.any(neg_audio == rows), "a positive was drawn as audio negative"
    w_a2s, w_s2a = (np.asarray(w) for w in losses.hard_negative_weights(sim, sim.T))
    for drawn, weights in ((neg_symbo, w_a2s), (neg_audio, w_s2a)):
        for i in range(batch):
            freq = np.bincount(drawn[:, i], minlength=batch) / draws
            sd = np.sqrt(weights[i] * (1 - weights[i]) / draws)
            assert np.all(np.abs(freq - weights[i]) <= 5 * sd + 1e-9), (i, freq, weights[i])
    # the two directions use independent keys
    assert np.mean(neg_symbo == neg_audio) < 0.9


def test_itm_matches_torch():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((9, 4, 2)).astype(np.float32)
    got = losses.itm_loss(jnp.asarray(logits))
    want = ref.itm(_t(logits))
    np.testing.assert_allclose(float(got), want.item(), atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(losses.itm_labels(3)), [1, 1, 1, 0, 0, 0, 0, 0, 0])


def _note_batch(rng: np.random.Generator, batch: int, n: int):
    """Notes laid out as the stage-1 collate does: lead sheet, SOS, arrangement, EOS, pads."""
    notes = np.ones((batch, n, 8), np.int64)
    ls_mask = np.zeros((batch, n), np.int64)
    pad_mask = np.zeros((batch, n), np.int64)
    for b in range(batch):
        n_ls = int(rng.integers(1, 4))
        n_arr = int(rng.integers(1, n - n_ls - 1))
        notes[b, :n_ls] = rng.integers(4, 1236, (n_ls, 8))
        notes[b, n_ls] = 0
        notes[b, n_ls + 1 : n_ls + 1 + n_arr] = rng.integers(4, 1236, (n_arr, 8))
        notes[b, n_ls + 1 + n_arr] = 2
        ls_mask[b, n_ls:] = 1
        pad_mask[b, : n_ls + n_arr + 2] = 1
    return notes.reshape(batch, n * 8), ls_mask, pad_mask


def test_itg_inputs_match_torch():
    rng = np.random.default_rng(5)
    notes, ls_mask, pad_mask = _note_batch(rng, 3, 9)
    ids, labels = losses.itg_inputs(
        jnp.asarray(notes), jnp.asarray(ls_mask), jnp.asarray(pad_mask), dec_token_id=1237
    )
    want_ids, want_labels = ref.itg_inputs(_t(notes), _t(ls_mask), _t(pad_mask))
    np.testing.assert_array_equal(np.asarray(ids), want_ids.numpy())
    np.testing.assert_array_equal(np.asarray(labels), want_labels.numpy())
    assert np.all(np.asarray(ids)[notes == 0] == 1237)
    # the EOS octuple is a target, the SOS/DEC octuple is not
    assert np.any(np.asarray(labels) == 2) and not np.any(np.asarray(labels) == 1237)


@pytest.mark.parametrize("field_mean", ["official", "valid"])
def test_itg_loss_matches_torch(field_mean):
    rng = np.random.default_rng(6)
    notes, ls_mask, pad_mask = _note_batch(rng, 3, 9)
    _, labels = ref.itg_inputs(_t(notes), _t(ls_mask), _t(pad_mask))
    logits = rng.standard_normal((3, 72, 1237)).astype(np.float32) * 2
    got, got_fields = losses.itg_loss(
        jnp.asarray(logits), jnp.asarray(labels.numpy()), field_mean=field_mean
    )
    want, want_fields = ref.itg(_t(logits), labels, field_mean)
    np.testing.assert_allclose(np.asarray(got_fields), want_fields.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(float(got), want.item(), atol=TOL, rtol=0)
    # the head may skip the last note: pre-shifted logits (notes 0..N-2) give the same loss
    pre, pre_fields = losses.itg_loss(
        jnp.asarray(logits[:, :-8]),
        jnp.asarray(labels.numpy()),
        field_mean=field_mean,
        shifted=True,
    )
    np.testing.assert_allclose(np.asarray(pre_fields), want_fields.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(float(pre), want.item(), atol=TOL, rtol=0)


def test_itg_official_and_valid_differ_by_the_valid_fraction():
    """With ignored slots, official = valid * (valid targets / all slots) per field."""
    rng = np.random.default_rng(7)
    notes, ls_mask, pad_mask = _note_batch(rng, 2, 10)
    _, labels = losses.itg_inputs(
        jnp.asarray(notes), jnp.asarray(ls_mask), jnp.asarray(pad_mask), dec_token_id=1237
    )
    logits = jnp.asarray(rng.standard_normal((2, 80, 1237)).astype(np.float32))
    _, official = losses.itg_loss(logits, labels, field_mean="official")
    _, valid = losses.itg_loss(logits, labels, field_mean="valid")
    targets = np.asarray(labels)[:, 8:].reshape(-1, 8)
    fraction = (targets != -100).sum(0) / targets.shape[0]
    assert np.all(fraction < 1.0)
    np.testing.assert_allclose(np.asarray(official), np.asarray(valid) * fraction, rtol=1e-5)
    with pytest.raises(ValueError, match="field_mean"):
        losses.itg_loss(logits, labels, field_mean="mean")


def test_global_batch_losses_on_a_sharded_batch_equal_single_device():
    """DESIGN "Batches are global": with the batch sharded over 8 devices, the similarity matrix,
    the hard-negative draw and every loss equal the single-device values (GSPMD gathers)."""
    from bossa_jax import sharding
    from bossa_jax.config import MeshConfig

    rng = np.random.default_rng(8)
    batch = 8
    audio, symbo = _unit(rng, batch, 4, 16), _unit(rng, batch, 16)
    notes, ls_mask, pad_mask = _note_batch(rng, batch, 6)
    logits = rng.standard_normal((batch, 48, 1237)).astype(np.float32)

    def all_losses(audio, symbo, notes, ls_mask, pad_mask, logits, key):
        sim = losses.similarity(audio, symbo, 0.07)
        neg = losses.sample_hard_negatives(key, sim, sim.T)
        _, labels = losses.itg_inputs(notes, ls_mask, pad_mask, dec_token_id=1237)
        itg, fields = losses.itg_loss(logits, labels)
        return losses.itc_loss(sim, sim.T), neg, itg, fields

    args = (audio, symbo, notes, ls_mask, pad_mask, logits)
    key = jax.random.key(0)
    single = jax.jit(all_losses)(*(jnp.asarray(a) for a in args), key)
    cfg = MeshConfig(shape={"data": 8, "fsdp": 1, "tensor": 1})
    mesh = sharding.make_mesh(cfg)
    with sharding.use_mesh(mesh, sharding.rules_of(cfg)):
        sharded_args = [jax.device_put(a, sharding.batch_sharding(mesh, np.ndim(a))) for a in args]
        assert not sharded_args[0].sharding.is_fully_replicated
        sharded = jax.jit(all_losses)(*sharded_args, key)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
