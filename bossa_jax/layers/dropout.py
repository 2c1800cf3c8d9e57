"""Inverted dropout shared by every model (DESIGN "Layout": one dropout).

A ``Dropout`` is a stream: one key per forward pass, and each call site draws a fresh key by
folding in a trace-time counter, so the pattern is reproducible for a given key and call order.
Without a key it is the identity, which is how evaluation and frozen networks run.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p


class Dropout:
    """Inverted dropout, a fresh key per call site (trace-time counter); off without a key."""

    def __init__(self, key: jax.Array | None):
        self.key = key
        self.count = 0

    @classmethod
    def stream(cls, deterministic: bool, key: jax.Array | None, owner: str = "model") -> Dropout:
        """The stream for one forward pass: off when ``deterministic``, else needs ``key``."""
        if deterministic:
            return cls(None)
        if key is None:
            raise ValueError(f"{owner}: deterministic=False needs a dropout_rng key")
        return cls(key)

    @property
    def active(self) -> bool:
        return self.key is not None

    def __call__(self, x: jax.Array, rate: float) -> jax.Array:
        if self.key is None or rate == 0.0:
            return x
        self.count += 1
        keep = keep_mask(jax.random.fold_in(self.key, self.count), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """Bernoulli(``keep_prob``) booleans of ``shape`` from a threefry ``key``.

    ``jax.random.bernoulli`` (partitionable threefry) hashes once per element and XORs the two
    output words; here each hash of an element pair's global index gives both words, one per
    element: half the hashing (dropout's random bits are ~10% of a stage-1 step on CPU), and the
    pattern still depends only on the key and the element index, never on the sharding.
    Other key implementations fall back to ``jax.random.bernoulli``.
    """
    data = jax.random.key_data(key)
    if data.shape != (2,) or not shape or data.dtype != jnp.uint32:
        return jax.random.bernoulli(key, keep_prob, shape)
    half = (*shape[:-1], (shape[-1] + 1) // 2)
    if math.prod(half) >= 2**32:
        return jax.random.bernoulli(key, keep_prob, shape)
    index = jnp.zeros(half, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(half))):
        index = index + lax.broadcasted_iota(jnp.uint32, half, dim) * jnp.uint32(stride)
        stride *= half[dim]
    first, second = threefry2x32_p.bind(data[0], data[1], jnp.zeros_like(index), index)
    bits = jnp.stack([first, second], axis=-1).reshape(*shape[:-1], 2 * half[-1])
    threshold = min(round(keep_prob * 2**32), 2**32 - 1)
    return bits[..., : shape[-1]] < jnp.uint32(threshold)
