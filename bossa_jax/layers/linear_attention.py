"""Causal linear attention, MuseCoco's attention (SPEC 4.5; DESIGN "Linear attention").

fast-transformers' ``CausalLinearAttention`` as MuseCoco's HF port uses it: feature map
phi(x) = elu(x) + 1 on queries and keys, keys at padded positions zeroed after phi, and

    out_i = phi(q_i) . sum_{j<=i} phi(k_j) v_j^T / (phi(q_i) . sum_{j<=i} phi(k_j) + 1e-6)

with no 1/sqrt(d) scaling and no attention dropout. Sums and normalisers are fp32 whatever the
compute dtype. Two forms compute the same numbers:

* :func:`causal_linear_attention`, the parallel form for training and prompts: the sequence is cut
  into chunks of ``chunk_size``; within a chunk a masked (C x C) product, across chunks the running
  state carried by ``lax.scan``. Memory is O(L d + C^2) per head, never O(L^2).
* :func:`linear_attention_step`, the recurrent form for decoding: the state S = sum phi(k) v^T
  (B, H, D, Dv) and z = sum phi(k) (B, H, D) per head, O(1) per token (the official port instead
  re-projects and recomputes the whole prefix at every step, SPEC 10.18).

Layout is (batch, length, heads, head_dim), as in ``layers.attention``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bossa_jax.layers.attention import AttentionProjections
from bossa_jax.layers.linear import default_kernel_init

EPS = 1e-6  # fast-transformers' CausalLinearAttention default
# The sums run in full fp32 whatever the backend's default (TF32 on GPU, bf16 passes on TPU), as
# fast-transformers' kernels do; they are a few percent of the block's FLOPs.
_sum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
DEFAULT_CHUNK = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LinearAttentionState:
    """The running sums of one attention layer: everything decoding needs about the past."""

    kv: jax.Array  # (B, H, D, Dv) fp32: sum_j phi(k_j) v_j^T
    k_sum: jax.Array  # (B, H, D) fp32: sum_j phi(k_j)

    @classmethod
    def empty(cls, batch: int, heads: int, key_dim: int, value_dim: int) -> LinearAttentionState:
        return cls(
            jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32),
            jnp.zeros((batch, heads, key_dim), jnp.float32),
        )


def feature_map(x: jax.Array) -> jax.Array:
    """phi(x) = elu(x) + 1 in fp32 (positive, so the normaliser never vanishes)."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def _masked_keys(k: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    """phi(k) with the keys where ``key_mask`` is False zeroed (after phi, as upstream)."""
    phi_k = feature_map(k)
    if key_mask is None:
        return phi_k
    return phi_k * key_mask.astype(jnp.float32)[..., None, None]


def causal_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    state: LinearAttentionState | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    eps: float = EPS,
) -> tuple[jax.Array, LinearAttentionState]:
    """The parallel causal form. q, k (B, L, H, D), v (B, L, H, Dv); ``key_mask`` (B, L) bool,
    True = a real key (False: padded, contributes nothing). ``state`` continues from earlier
    positions (default: none). Returns the output (B, L, H, Dv) in q's dtype and the state after
    the last position."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    chunk = max(1, min(chunk_size, length))
    num_chunks = math.ceil(length / chunk)
    extra = num_chunks * chunk - length

    def chunked(x: jax.Array) -> jax.Array:
        # (B, L, H, D) -> (num_chunks, B, H, chunk, D); padded keys are zero so add nothing
        x = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
        x = x.reshape(batch, num_chunks, chunk, heads, x.shape[-1])
        return x.transpose(1, 0, 3, 2, 4)

    xs = (
        chunked(feature_map(q)),
        chunked(_masked_keys(k, key_mask)),
        chunked(v.astype(jnp.float32)),
    )
    causal = jnp.tril(jnp.ones((chunk, chunk), jnp.float32))

    # rematerialised in the backward pass: only each chunk's inputs and incoming state are kept,
    # not its (C x C) scores (one paper-size layer, batch 4, L 1032: backward temporaries
    # 409 -> 311 MB as compiled for CPU)
    @jax.checkpoint
    def body(
        carry: LinearAttentionState | None, block: tuple[jax.Array, jax.Array, jax.Array]
    ) -> tuple[LinearAttentionState, jax.Array]:
        """One chunk; ``carry`` None: nothing before it."""
        phi_q, phi_k, values = block  # (B, H, C, D), (B, H, C, D), (B, H, C, Dv)
        scores = _sum("bhid,bhjd->bhij", phi_q, phi_k) * causal
        numerator = _sum("bhij,bhje->bhie", scores, values)
        normaliser = jnp.sum(scores, axis=-1)
        if carry is not None:
            numerator = numerator + _sum("bhid,bhde->bhie", phi_q, carry.kv)
            normaliser = normaliser + _sum("bhid,bhd->bhi", phi_q, carry.k_sum)
        out = numerator / (normaliser[..., None] + eps)
        added = LinearAttentionState(_sum("bhjd,bhje->bhde", phi_k, values), jnp.sum(phi_k, axis=2))
        if carry is not None:
            added = LinearAttentionState(carry.kv + added.kv, carry.k_sum + added.k_sum)
        return added, out

    if state is None and num_chunks == 1:
        # No scan and no empty state: jaxlib 0.10.2's XLA CPU fuses a one-chunk scan's products
        # with a constant all-zero state into one YNNPACK fusion that returns garbage (~1e30 or
        # NaN) from batch 4-8 at 8 heads of 64 (a prompt of <= 128 tokens in a batch of songs).
        state, out = body(None, jax.tree.map(lambda x: x[0], xs))
        out = out[None]
    else:
        if state is None:
            state = LinearAttentionState.empty(batch, heads, key_dim, value_dim)
        state, out = jax.lax.scan(body, state, xs)
    # (num_chunks, B, H, chunk, Dv) -> (B, L, H, Dv)
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, num_chunks * chunk, heads, value_dim)
    return out[:, :length].astype(q.dtype), state


def linear_attention_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: LinearAttentionState,
    *,
    key_mask: jax.Array | None = None,
    eps: float = EPS,
) -> tuple[jax.Array, LinearAttentionState]:
    """The recurrent form for one position: q, k (B, H, D), v (B, H, Dv), ``key_mask`` (B,) bool.
    Adds this key to the state, then reads it with the query (the position sees itself)."""
    phi_q = feature_map(q)
    phi_k = _masked_keys(k[:, None], None if key_mask is None else key_mask[:, None])[:, 0]
    state = LinearAttentionState(
        state.kv + phi_k[..., :, None] * v.astype(jnp.float32)[..., None, :],
        state.k_sum + phi_k,
    )
    numerator = _sum("bhd,bhde->bhe", phi_q, state.kv)
    normaliser = _sum("bhd,bhd->bh", phi_q, state.k_sum)
    return (numerator / (normaliser[..., None] + eps)).astype(q.dtype), state


class CausalLinearAttention(AttentionProjections):
    """Multi-head causal linear attention on :class:`~bossa_jax.layers.attention.
    AttentionProjections` (the q/k/v/out projections softmax attention uses; LoRA on q/k/v when
    ``lora_rank`` > 0, SPEC 4.4; heads ``features // num_heads`` wide by default, MuseCoco's
    2040 of 2048)."""

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        lora_rank: int = 0,
        lora_scale: float = 1.0,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        lora_dtype: jnp.dtype = jnp.float32,
        chunk_size: int = DEFAULT_CHUNK,
        eps: float = EPS,
        kernel_init=default_kernel_init,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            features,
            num_heads,
            head_dim=head_dim,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            lora_rank=lora_rank,
            lora_scale=lora_scale,
            lora_dtype=lora_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.chunk_size = chunk_size
        self.eps = eps

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (self.project_q(x), *self.project_kv(x))

    def empty_state(self, batch: int) -> LinearAttentionState:
        return LinearAttentionState.empty(batch, self.num_heads, self.head_dim, self.head_dim)

    def __call__(
        self,
        x: jax.Array,
        *,
        key_mask: jax.Array | None = None,
        state: LinearAttentionState | None = None,
    ) -> tuple[jax.Array, LinearAttentionState]:
        """x (B, L, features) -> (output (B, L, features), state after the last position)."""
        q, k, v = self._qkv(x)
        out, state = causal_linear_attention(
            q, k, v, key_mask=key_mask, state=state, chunk_size=self.chunk_size, eps=self.eps
        )
        return self.project_out(out), state

    def step(
        self,
        x: jax.Array,
        state: LinearAttentionState,
        *,
        key_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, LinearAttentionState]:
        """One position: x (B, features) -> (output (B, features), updated state)."""
        q, k, v = self._qkv(x)
        out, state = linear_attention_step(q, k, v, state, key_mask=key_mask, eps=self.eps)
        return self.project_out(out), state
