"""Causal linear attention (SPEC 4.5): the chunked parallel form against the formula, the recurrent
step against the parallel form, state continuation, precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bossa_jax.layers import (
    CausalLinearAttention,
    LinearAttentionState,
    linear_attention_step,
)
from bossa_jax.layers import causal_linear_attention as _parallel

causal_linear_attention = jax.jit(_parallel, static_argnames="chunk_size")

B, L, H, D, DV = 2, 13, 3, 5, 4


def _inputs(seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, L, H, D))
    k = jax.random.normal(kk, (B, L, H, D))
    v = jax.random.normal(kv, (B, L, H, DV))
    key_mask = np.ones((B, L), bool)
    key_mask[1, 9:] = False  # right padding
    key_mask[0, 4] = False  # a masked key inside the sequence
    return q, k, v, jnp.asarray(key_mask)


def _formula(q, k, v, key_mask):
    """SPEC 4.5 written out quadratically in float64 numpy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    phi_q = np.where(q > 0, q + 1, np.exp(q))
    phi_k = np.where(k > 0, k + 1, np.exp(k)) * np.asarray(key_mask)[:, :, None, None]
    scores = np.einsum("bihd,bjhd->bhij", phi_q, phi_k) * np.tril(np.ones((L, L)))
    out = np.einsum("bhij,bjhe->bihe", scores, v)
    return out / (scores.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_parallel_form_matches_formula(chunk):
    q, k, v, key_mask = _inputs()
    out, state = causal_linear_attention(q, k, v, key_mask=key_mask, chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(out), _formula(q, k, v, key_mask), atol=1e-5, rtol=1e-5)
    # the final state sums exactly the unmasked keys
    phi_k = (jax.nn.elu(k) + 1) * key_mask[:, :, None, None]
    np.testing.assert_allclose(state.k_sum, phi_k.sum(1), rtol=1e-5)
    np.testing.assert_allclose(
        state.kv, jnp.einsum("blhd,blhe->bhde", phi_k, v), rtol=1e-5, atol=1e-5
    )


def test_recurrent_step_equals_parallel_form_at_every_position():
    q, k, v, key_mask = _inputs(1)
    parallel, final = causal_linear_attention(q, k, v, key_mask=key_mask, chunk_size=4)
    state = LinearAttentionState.empty(B, H, D, DV)
    step = jax.jit(linear_attention_step)
    for i in range(L):
        out, state = step(q[:, i], k[:, i], v[:, i], state, key_mask=key_mask[:, i])
        np.testing.assert_allclose(np.asarray(out), np.asarray(parallel[:, i]), atol=1e-5)
    np.testing.assert_allclose(state.kv, final.kv, atol=1e-5)
    np.testing.assert_allclose(state.k_sum, final.k_sum, atol=1e-5)


def test_parallel_form_continues_from_a_state():
    q, k, v, key_mask = _inputs(2)
    whole, _ = causal_linear_attention(q, k, v, key_mask=key_mask, chunk_size=3)
    first, state = causal_linear_attention(
        q[:, :6], k[:, :6], v[:, :6], key_mask=key_mask[:, :6], chunk_size=4
    )
    rest, _ = causal_linear_attention(
        q[:, 6:], k[:, 6:], v[:, 6:], key_mask=key_mask[:, 6:], state=state, chunk_size=4
    )
    np.testing.assert_allclose(np.concatenate([first, rest], 1), whole, atol=1e-5)


def test_bf16_inputs_keep_fp32_state():
    q, k, v, key_mask = _inputs(3)
    out, state = causal_linear_attention(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), key_mask=key_mask
    )
    assert out.dtype == jnp.bfloat16
    assert state.kv.dtype == state.k_sum.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out, np.float32), _formula(q, k, v, key_mask), atol=5e-2, rtol=5e-2
    )


def test_module_step_equals_call_with_uneven_heads():
    # 3 heads on 16 features: heads of 5, q/k/v 15 wide, out_proj 15 -> 16
    attn = CausalLinearAttention(16, 3, lora_rank=2, chunk_size=4, rngs=nnx.Rngs(0))
    assert attn.q_proj.kernel.shape == (16, 15) and attn.out_proj.kernel.shape == (15, 16)
    x = jax.random.normal(jax.random.key(4), (B, 7, 16))
    mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [5]]))
    full, final = attn(x, key_mask=mask)
    state = attn.empty_state(B)
    for i in range(7):
        out, state = attn.step(x[:, i], state, key_mask=mask[:, i])
        np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, i]), atol=1e-5)
    np.testing.assert_allclose(state.kv, final.kv, atol=1e-5)


@pytest.mark.parametrize("length", [96, 256])  # one chunk (no scan) and two
def test_every_row_of_a_batch_equals_the_row_alone(length):
    # jaxlib 0.10.2's XLA CPU returned ~1e30 / NaN here for one chunk from batch 4-8 (a YNNPACK
    # fusion with the constant empty state); MuseCoco-200m's head shape, a batch of 8 prompts
    q, k, v = jax.random.normal(jax.random.key(5), (3, 1, length, 8, 64))
    run = jax.jit(lambda q, k, v: _parallel(q, k, v)[0])
    alone = np.asarray(run(q, k, v))
    batch = np.asarray(run(*(jnp.repeat(a, 8, axis=0) for a in (q, k, v))))
    assert np.isfinite(batch).all()
    np.testing.assert_allclose(batch, np.repeat(alone, 8, axis=0), atol=1e-5)
