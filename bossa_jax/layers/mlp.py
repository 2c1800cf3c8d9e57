"""Feed-forward blocks: plain (fc1 -> act -> fc2) and gated (act(gate) * up -> down)."""

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
    """fc2(act(fc1(x))), or with ``gated`` down(act(gate(x)) * up(x))."""

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        act: str = "gelu",
        gated: bool = False,
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
        self.gate = Linear(features, hidden, axes=("embed", "mlp"), **common) if gated else None
        self.fc2 = Linear(hidden, features, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        fn = activation(self.act)
        h = fn(self.gate(x)) * self.fc1(x) if self.gate is not None else fn(self.fc1(x))
        return self.fc2(h)
