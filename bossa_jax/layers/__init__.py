"""Shared building blocks, written once (DESIGN "Layout": layers/).

Parameters only *declare* logical axis names; shardings are applied by
``bossa_jax.sharding.create_sharded`` (a jitted init under the mesh). Flax's eager sharding is
turned off so the same modules can also be built without a mesh (tests, converters, one device).
"""

from flax import nnx as _nnx

_nnx.use_eager_sharding(False)

from bossa_jax.layers.attention import Attention, KVCache, dot_product_attention
from bossa_jax.layers.dropout import Dropout
from bossa_jax.layers.linear import Embed, Linear
from bossa_jax.layers.mlp import MLP, activation
from bossa_jax.layers.norm import LayerNorm
from bossa_jax.layers.positions import (
    fairseq_position_ids,
    fairseq_positions,
    musicgen_positions,
    sinusoidal,
)
from bossa_jax.layers.stack import scan_modules, stack_modules

__all__ = [
    "MLP",
    "Attention",
    "Dropout",
    "Embed",
    "KVCache",
    "LayerNorm",
    "Linear",
    "activation",
    "dot_product_attention",
    "fairseq_position_ids",
    "fairseq_positions",
    "musicgen_positions",
    "scan_modules",
    "sinusoidal",
    "stack_modules",
]
