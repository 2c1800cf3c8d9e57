"""Sinusoidal position encodings in the two conventions BOSSA's networks use.

* HF MusicGen (SPEC 1.2): first half cos, second half sin, positions 0..S-1, no offset.
* fairseq / MuseCoco (SPEC 4.5): first half sin, second half cos; positions from
  :func:`fairseq_position_ids` (padding_idx + 1 + index over non-pad tokens, optionally counted
  from a start index, SPEC 4.3), pad rows zero.

Both use inverse frequencies exp(-i * ln(10000) / (d/2 - 1)) computed in fp32, as upstream does.
Values are computed on the fly (no 8194 x 2048 table).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _inverse_frequencies(dim: int) -> np.ndarray:
    half = dim // 2
    step = np.float32(math.log(10000) / (half - 1))
    return np.exp(np.arange(half, dtype=np.float32) * -step).astype(np.float32)


def sinusoidal(positions: jax.Array, dim: int, *, sin_first: bool) -> jax.Array:
    """(..., L) integer positions -> (..., L, dim) fp32 encodings (odd ``dim``: last col zero)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(_inverse_frequencies(dim))
    halves = (jnp.sin(angles), jnp.cos(angles)) if sin_first else (jnp.cos(angles), jnp.sin(angles))
    out = jnp.concatenate(halves, axis=-1)
    if dim % 2:
        out = jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, 1)])
    return out


def musicgen_positions(length: int, dim: int, offset: int | jax.Array = 0) -> jax.Array:
    """HF ``MusicgenSinusoidalPositionalEmbedding`` rows offset..offset+length-1: (length, dim)."""
    return sinusoidal(jnp.arange(length) + offset, dim, sin_first=False)


def fairseq_position_ids(
    tokens: jax.Array, padding_idx: int, start: int | jax.Array = 0
) -> jax.Array:
    """fairseq ``make_positions`` over ``tokens[..., start:]``: cumulative count of non-pad tokens +
    padding_idx; pads, and every token before index ``start``, get padding_idx (no position).

    ``start`` is MuseCoco's ``pos_start`` (SPEC 4.3: 61): the token at index i >= start gets the
    position fairseq gives index i - start, so the first counted token gets padding_idx + 1.
    """
    index = jnp.arange(tokens.shape[-1])
    counted = ((tokens != padding_idx) & (index >= start)).astype(jnp.int32)
    return jnp.cumsum(counted, axis=-1) * counted + padding_idx


def fairseq_positions(position_ids: jax.Array, dim: int, padding_idx: int) -> jax.Array:
    """fairseq ``SinusoidalPositionalEmbedding`` rows for ``position_ids`` (row padding_idx = 0)."""
    table = sinusoidal(position_ids, dim, sin_first=True)
    return jnp.where((position_ids == padding_idx)[..., None], 0.0, table)
