"""LayerNorm with fp32 statistics (DESIGN "Precision"): the input is upcast, normalised, scaled,
and cast back to its own dtype, as BOSSA's fp32 LayerNorm subclass does (SPEC 1.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LayerNorm(nnx.Module):
    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        use_bias: bool = True,
        axis_name: str | None = "embed",
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic init: scale 1, bias 0
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(axis_name,))
        self.bias = (
            nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=(axis_name,))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)
