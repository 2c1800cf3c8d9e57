"""Shared building blocks, written once (DESIGN "Layout": layers/).

Parameters only *declare* logical axis names; shardings are applied by
``bossa_jax.sharding.create_sharded`` (a jitted init under the mesh). Flax's eager sharding is
turned off so the same modules can also be built without a mesh (tests, converters, one device).
"""

from flax import nnx as _nnx

_nnx.use_eager_sharding(False)

from bossa_jax.layers.attention import (
    Attention,
    AttentionProjections,
    KVCache,
    dot_product_attention,
)
from bossa_jax.layers.dropout import Dropout
from bossa_jax.layers.linear import Embed, Linear
from bossa_jax.layers.linear_attention import (
    CausalLinearAttention,
    LinearAttentionState,
    causal_linear_attention,
    linear_attention_step,
)
from bossa_jax.layers.lora import LoRA, LoRALinear, merge_lora
from bossa_jax.layers.mlp import MLP, activation
from bossa_jax.layers.norm import LayerNorm
from bossa_jax.layers.positions import (
    fairseq_position_ids,
    fairseq_positions,
    musicgen_positions,
    sinusoidal,
)
from bossa_jax.layers.stack import scan_modules, stack_modules, unstack, unstack_modules

__all__ = [
    "MLP",
    "Attention",
    "AttentionProjections",
    "CausalLinearAttention",
    "Dropout",
    "Embed",
    "KVCache",
    "LayerNorm",
    "Linear",
    "LinearAttentionState",
    "LoRA",
    "LoRALinear",
    "activation",
    "causal_linear_attention",
    "dot_product_attention",
    "fairseq_position_ids",
    "fairseq_positions",
    "linear_attention_step",
    "merge_lora",
    "musicgen_positions",
    "scan_modules",
    "sinusoidal",
    "stack_modules",
    "unstack",
    "unstack_modules",
]
