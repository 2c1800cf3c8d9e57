"""Low-rank adapters on a Linear (SPEC 4.4; DESIGN "Trainable vs frozen is a filter").

BOSSA's LoRA is MuseCoco's own ``LoRALayer``, not peft: delta(x) = scale * B A x added to the base
projection's output (bias included), A ~ N(0, 1) / rank, B = 0, scale 1.0 (no alpha / rank), no
dropout. Kernels are stored in Flax orientation: ``a`` (in, rank) = A^T and ``b`` (rank, out) = B^T.

The adapter matrices are :class:`flax.nnx.LoRAParam` variables, so ``nnx.LoRAParam`` selects exactly
them (the stage-2 trainable filter) and ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` the frozen
base (``LoRAParam`` is a subclass of ``Param``). :func:`merge_lora` folds every adapter into its
base kernel for export.
"""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from bossa_jax.layers.linear import Initializer, Linear, default_kernel_init

M = TypeVar("M", bound=nnx.Module)


class LoRA(nnx.Module):
    """The adapter alone: x -> scale * (x @ a) @ b, a (in, rank) and b (rank, out)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        scale: float = 1.0,
        axes: tuple[str | None, str | None],
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank = rank
        self.scale = scale
        self.dtype = dtype
        # SPEC 4.4: A ~ N(0, 1) / rank, B = 0, so a fresh adapter changes nothing
        a = jax.random.normal(rngs.params(), (in_features, rank), jnp.float32) / rank
        self.a = nnx.LoRAParam(a.astype(param_dtype), out_sharding=(axes[0], "lora"))
        self.b = nnx.LoRAParam(
            jnp.zeros((rank, out_features), param_dtype), out_sharding=("lora", axes[1])
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        low = jnp.matmul(x.astype(dtype), self.a[...].astype(dtype))
        y = jnp.matmul(low, self.b[...].astype(dtype))
        return y if self.scale == 1.0 else y * jnp.asarray(self.scale, dtype)

    def kernel_delta(self) -> jax.Array:
        """scale * a @ b in fp32: what merging adds to the base kernel (stacked layers too)."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return self.scale * jnp.matmul(a, b)


class LoRALinear(Linear):
    """A :class:`Linear` plus an optional adapter: y = x @ kernel + bias + lora(x).

    ``rank`` 0 builds no adapter (a plain Linear with the same parameter names). The adapter's
    parameters keep ``lora_dtype`` (fp32: they are trained) while the base may be bf16.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rank: int = 0,
        scale: float = 1.0,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        lora_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            axes=axes,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.lora = (
            LoRA(
                in_features,
                out_features,
                rank,
                scale=scale,
                axes=axes,
                dtype=dtype,
                param_dtype=lora_dtype,
                rngs=rngs,
            )
            if rank > 0
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y


def merge_lora(module: M) -> M:
    """A copy of ``module`` with every adapter folded into its base kernel and removed.

    kernel' = kernel + scale * a @ b (in fp32, cast back to the kernel's dtype), so the merged
    module computes the same function with only base parameters: the upstream layout without
    ``lora_*`` keys. Works on stacked (scanned) layers, whose kernels carry a leading axis.
    """
    merged = nnx.clone(module)
    layers = [node for _, node in nnx.iter_graph(merged) if isinstance(node, LoRALinear)]
    for layer in layers:
        if layer.lora is None:
            continue
        kernel = layer.kernel[...]
        layer.kernel.set_value(
            (kernel.astype(jnp.float32) + layer.lora.kernel_delta()).astype(kernel.dtype)
        )
        layer.lora = None
    return merged
