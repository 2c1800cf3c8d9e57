"""Inverted dropout shared by every model (DESIGN "Layout": one dropout).

A ``Dropout`` is a stream: one key per forward pass, and each call site draws a fresh key by
folding in a trace-time counter, so the pattern is reproducible for a given key and call order.
Without a key it is the identity, which is how evaluation and frozen networks run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, self.count), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
