"""Shared layers against PyTorch/HF references (issue 2 item 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from bossa_jax.layers import (
    MLP,
    Attention,
    Dropout,
    KVCache,
    LayerNorm,
    Linear,
    dot_product_attention,
    fairseq_position_ids,
    fairseq_positions,
    musicgen_positions,
)
from tests.reference.musecoco_torch import fairseq_table, make_positions


def test_musicgen_positions_match_hf():
    from transformers.models.musicgen.modeling_musicgen import (
        MusicgenSinusoidalPositionalEmbedding,
    )

    ref = MusicgenSinusoidalPositionalEmbedding(600, 64)
    ids = torch.zeros(1, 4, 512, dtype=torch.long)
    expected = ref(ids).numpy()
    got = np.asarray(musicgen_positions(512, 64))
    # fp32 sin/cos of angles near 500 rad differ by ~1 ulp (3e-5) between libraries
    np.testing.assert_allclose(got, expected.reshape(512, 64), atol=1e-4)
    # cos half first, no offset
    np.testing.assert_allclose(got[0, :32], 1.0)
    np.testing.assert_allclose(got[0, 32:], 0.0)


def _fairseq_reference(tokens: torch.Tensor, dim: int, padding_idx: int) -> torch.Tensor:
    """fairseq SinusoidalPositionalEmbedding as SPEC 4.5 describes it (sin half first)."""
    return fairseq_table(8194, dim, padding_idx)[make_positions(tokens, padding_idx)]


def test_fairseq_positions_match_reference():
    tokens = torch.tensor([[5, 7, 9, 1, 1], [4, 1, 6, 8, 3]])
    expected = _fairseq_reference(tokens, 16, padding_idx=1).numpy()
    ids = fairseq_position_ids(jnp.asarray(tokens.numpy()), 1)
    np.testing.assert_array_equal(np.asarray(ids), [[2, 3, 4, 1, 1], [2, 1, 3, 4, 5]])
    got = np.asarray(fairseq_positions(ids, 16, 1))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.all(got[0, 3:] == 0)  # pad rows are zero


def test_fairseq_positions_from_a_start_index():
    # SPEC 4.3: tokens before index `start` get no position; token i >= start gets the fairseq
    # position of index i - start (pads still none)
    tokens = torch.tensor([[2, 9, 9, 9, 4, 5, 6, 1], [2, 9, 9, 9, 4, 1, 1, 1]])
    start = 3
    ids = np.asarray(fairseq_position_ids(jnp.asarray(tokens.numpy()), 1, start))
    np.testing.assert_array_equal(ids, [[1, 1, 1, 2, 3, 4, 5, 1], [1, 1, 1, 2, 3, 1, 1, 1]])
    expected = _fairseq_reference(tokens[:, start:], 16, padding_idx=1).numpy()
    got = np.asarray(fairseq_positions(jnp.asarray(ids), 16, 1))
    np.testing.assert_allclose(got[:, start:], expected, atol=1e-5)
    assert not np.any(got[:, :start])


def test_layernorm_fp32_statistics():
    ln = LayerNorm(8, eps=1e-5)
    x = jax.random.normal(jax.random.key(0), (3, 8)) * 100 + 1000
    ref = torch.nn.functional.layer_norm(torch.tensor(np.asarray(x)), (8,), eps=1e-5).numpy()
    np.testing.assert_allclose(np.asarray(ln(x)), ref, atol=1e-4)
    y = ln(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16


def _torch_mha(attn: Attention, x: np.ndarray, causal: bool, key_mask=None) -> np.ndarray:
    def w(lin: Linear):
        return torch.tensor(np.asarray(lin.kernel[...])), torch.tensor(np.asarray(lin.bias[...]))

    xt = torch.tensor(x)
    b, t, _ = xt.shape
    h, d = attn.num_heads, attn.head_dim

    def proj(lin):
        k, bias = w(lin)
        return (xt @ k + bias).view(b, t, h, d).transpose(1, 2)

    q, k, v = proj(attn.q_proj), proj(attn.k_proj), proj(attn.v_proj)
    mask = None
    if key_mask is not None:
        mask = torch.tensor(key_mask)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal
    )
    out = out.transpose(1, 2).reshape(b, t, h * d)
    ko, bo = w(attn.out_proj)
    return (out @ ko + bo).numpy()


def test_attention_matches_torch_sdpa():
    attn = Attention(16, 4, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 7, 16)))
    for causal in (False, True):
        got, _ = attn(jnp.asarray(x), is_causal=causal)
        np.testing.assert_allclose(np.asarray(got), _torch_mha(attn, x, causal), atol=1e-5)
    key_mask = np.ones((2, 7), bool)
    key_mask[1, 4:] = False
    got, _ = attn(jnp.asarray(x), mask=jnp.asarray(key_mask)[:, None, None, :])
    np.testing.assert_allclose(np.asarray(got), _torch_mha(attn, x, False, key_mask), atol=1e-5)


def test_fully_masked_row_is_finite():
    attn = Attention(16, 4, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 16))
    out, _ = attn(x, mask=jnp.zeros((1, 1, 1, 3), bool))
    assert np.isfinite(np.asarray(out)).all()


def test_kv_cache_decoding_equals_full_pass():
    attn = Attention(16, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, 16))
    full, _ = attn(x, is_causal=True)
    cache = KVCache.empty(2, 10, 4, 4)
    prefix, cache = attn(x[:, :3], is_causal=True, cache=cache)
    steps = [prefix]
    for i in range(3, 6):
        y, cache = jax.jit(lambda a, x, c: a(x, is_causal=True, cache=c))(
            attn, x[:, i : i + 1], cache
        )
        steps.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)
    assert int(cache.length) == 6


def test_cross_attention_and_past_keys():
    attn = Attention(16, 4, kv_features=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 3, 16))
    kv = jax.random.normal(jax.random.key(4), (2, 5, 8))
    out, _ = attn(x, kv)
    assert out.shape == (2, 3, 16)
    # past keys/values prepend: equal to attending over the concatenation
    self_attn = Attention(16, 4, rngs=nnx.Rngs(1))
    both = jax.random.normal(jax.random.key(5), (2, 5, 16))
    full, _ = self_attn(both)
    past = self_attn.project_kv(both[:, :2])
    tail, _ = self_attn(both[:, 2:], past=past)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 2:]), atol=1e-5)
    # return_kv: this call's own projections (without the past), as a later call's past
    _, own = self_attn(both[:, 2:], past=past, return_kv=True)
    for got, want in zip(own, self_attn.project_kv(both[:, 2:])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_attention_dropout_drops_probabilities():
    """Attention dropout (the Q-Former's BERT attention) on torch's eager formula: softmax of the
    masked logits, times the dropout keep pattern / (1 - rate), times v."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 3, 4)) for i in range(3))
    key_mask = np.ones((2, 1, 1, 5), bool)
    key_mask[1, ..., 3:] = False
    bias = jax.random.normal(jax.random.key(9), (2, 1, 5, 5))
    rate, key = 0.3, jax.random.key(7)
    got = dot_product_attention(
        q, k, v, mask=key_mask, bias=bias, dropout=Dropout(key), dropout_rate=rate
    )
    kept = Dropout(key)(jnp.ones((2, 3, 5, 5)), rate)  # the same first draw of the stream
    assert 0 < float(jnp.mean(kept == 0)) < 1
    scores = torch.from_numpy(np.einsum("bthd,bshd->bhts", q, k) / 2.0 + np.asarray(bias))
    scores = scores.masked_fill(~torch.from_numpy(key_mask), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, -1) * torch.from_numpy(np.array(kept))
    want = torch.einsum("bhts,bshd->bthd", probs, torch.from_numpy(np.array(v)))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)
    # without a key or at rate 0 it is the fused path
    plain = dot_product_attention(q, k, v, mask=key_mask, bias=bias)
    for off in (Dropout(None), Dropout(key)):
        out = dot_product_attention(q, k, v, mask=key_mask, bias=bias, dropout=off,
                                    dropout_rate=0.0 if off.active else rate)  # fmt: skip
        np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-6)


def test_mlp_matches_torch_gelu():
    mlp = MLP(8, 16, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(6), (3, 8)))
    k1, b1 = np.asarray(mlp.fc1.kernel[...]), np.asarray(mlp.fc1.bias[...])
    k2, b2 = np.asarray(mlp.fc2.kernel[...]), np.asarray(mlp.fc2.bias[...])
    h = torch.nn.GELU()(torch.tensor(x @ k1 + b1)).numpy()
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), h @ k2 + b2, atol=1e-5)


def test_causal_blocks_equal_full_causal_attention():
    from bossa_jax.layers.attention import causal_blocks

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 300, 4, 8)) for i in range(3))
    full = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    for block in (64, 128, 300):
        got = causal_blocks(q, k, v, block=block)
        np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5)
    # the CPU dispatch takes this path for long unmasked causal self-attention
    np.testing.assert_allclose(
        np.asarray(
            jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True))(q, k, v)
        ),
        np.asarray(full),
        atol=1e-5,
    )


def test_dropout_keep_mask_rate_and_sharding_independence():
    """keep_mask hashes element pairs (two words per threefry call): right keep rate for an odd
    last dim, a function of the key, and the same pattern when computed sharded on 8 devices."""
    from jax.sharding import NamedSharding, PartitionSpec

    from bossa_jax.layers.dropout import keep_mask

    shape = (8, 40, 1001)
    key = jax.random.key(3)
    mask = np.asarray(jax.jit(keep_mask, static_argnums=(1, 2))(key, 0.9, shape))
    assert mask.shape == shape and mask.dtype == bool
    assert abs(mask.mean() - 0.9) < 0.005
    assert abs(mask[..., -1].mean() - 0.9) < 0.08  # the unpaired last column is random too
    other = np.asarray(keep_mask(jax.random.key(4), 0.9, shape))
    assert (mask != other).mean() > 0.1
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    sharded = jax.jit(
        keep_mask,
        static_argnums=(1, 2),
        out_shardings=NamedSharding(mesh, PartitionSpec("data")),
    )(key, 0.9, shape)
    np.testing.assert_array_equal(np.asarray(sharded), mask)
