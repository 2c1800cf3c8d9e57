"""Linear and Embed with logical axis names (DESIGN "Sharding is declared next to the parameters").

Kernels are stored (in, out), the transpose of PyTorch's ``weight``; converters transpose once.
``dtype`` is the compute dtype (None: the input's); parameters keep ``param_dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = nnx.initializers.Initializer
default_kernel_init = nnx.initializers.normal(0.02)


class Linear(nnx.Module):
    """y = x @ kernel + bias, the kernel's axes named ``axes`` = (in_axis, out_axis)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype),
            out_sharding=axes,
        )
        self.bias = (
            nnx.Param(
                bias_init(rngs.params(), (out_features,), param_dtype), out_sharding=(axes[1],)
            )
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embed(nnx.Module):
    """A lookup table (num_embeddings, features) with axes ``axes`` (default vocab x embed)."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str | None, str | None] = ("vocab", "embed"),
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        embedding_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype or param_dtype
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype),
            out_sharding=axes,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
