"""The feed-forward block: fc1 -> activation -> fc2 (MusicGen, the Q-Former and MuseCoco all use
this plain form, SPEC 1.2, 2.1, 4.5)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bossa_jax.layers.linear import Linear, default_kernel_init

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() / HF "gelu" (erf)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """fc2(act(fc1(x)))."""

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        act: str = "gelu",
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init=default_kernel_init,
        rngs: nnx.Rngs,
    ):
        self.act = act
        common = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.fc1 = Linear(features, hidden, axes=("embed", "mlp"), **common)
        self.fc2 = Linear(hidden, features, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.act)(self.fc1(x)))
