"""MuseCoco-xLarge, the symbolic LM of stage 2: a pre-LN decoder with causal linear attention and
LoRA on q/k/v (SPEC 4.3-4.5; DESIGN "Linear attention", "Scan over layers").

* Token embeddings are sqrt(d) * E[token] (``scale_emb``; E has padding_idx 1) plus fairseq
  sinusoidal positions (sin half first) counted from ``position_start``: the token at index
  i >= start gets fairseq's position for index i - start, earlier tokens none (SPEC 4.3: start 61),
  then dropout. Optional prefix embeddings (stage 2's projected queries) are put in front with no
  scale, position or dropout; their keys are never masked.
* Blocks are pre-LN (eps 1e-5): x + Dropout(attn(LN1 x)); x + Dropout(fc2(GELU(fc1(LN2 x)))) with
  exact GELU; no attention dropout. Attention is causal linear attention
  (:mod:`bossa_jax.layers.linear_attention`) with heads ``hidden_size // num_attention_heads``
  wide (24 x 85 = 2040 of 2048), LoRA on q/k/v when ``cfg.lora`` (SPEC 4.4), keys of padded tokens
  zeroed.
* A final LayerNorm and an untied ``lm_head`` without bias give fp32 logits.

Two forms share the parameters: :meth:`MuseCoco.__call__` runs a whole sequence in the parallel
(chunked) form and can return every layer's linear-attention state after it (the sampler's state
after the prompt); :meth:`MuseCoco.decode_step` advances one token with that state, O(1) per token.
Blocks are stacked on a ``layers`` axis and scanned. ``cfg.dtype`` is the parameter and compute
dtype of the base (bf16 in production); LayerNorm statistics, linear-attention sums and the logits
are fp32; the LoRA matrices are fp32 parameters.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from bossa_jax import checkpoint
from bossa_jax.config import MuseCocoConfig
from bossa_jax.layers import (
    MLP,
    CausalLinearAttention,
    Dropout,
    Embed,
    LayerNorm,
    Linear,
    LinearAttentionState,
    fairseq_position_ids,
    fairseq_positions,
    merge_lora,
    scan_modules,
    stack_modules,
    unstack_modules,
)
from bossa_jax.sharding import constrain

ACTIVATION_AXES = ("batch", "length", "embed")
CONFIG_SECTION = "musecoco"


class MuseCocoBlock(nnx.Module):
    """One pre-LN block; HF-port names self_attn_layer_norm, self_attn, final_layer_norm, fc1/2."""

    def __init__(self, cfg: MuseCocoConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        self.dropout = cfg.dropout
        self.self_attn_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=dtype)
        self.self_attn = CausalLinearAttention(
            d,
            cfg.num_attention_heads,
            lora_rank=cfg.lora_rank if cfg.lora else 0,
            lora_scale=cfg.lora_scale,
            dtype=dtype,
            param_dtype=dtype,
            chunk_size=cfg.chunk_size,
            rngs=rngs,
        )
        self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=dtype)
        self.mlp = MLP(d, cfg.ffn_dim, act="gelu", dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None, dropout: Dropout
    ) -> tuple[jax.Array, LinearAttentionState]:
        attended, state = self.self_attn(self.self_attn_layer_norm(x), key_mask=key_mask)
        x = constrain(x + dropout(attended, self.dropout), *ACTIVATION_AXES)
        x = x + dropout(self.mlp(self.final_layer_norm(x)), self.dropout)
        return constrain(x, *ACTIVATION_AXES), state

    def step(
        self, x: jax.Array, state: LinearAttentionState
    ) -> tuple[jax.Array, LinearAttentionState]:
        """One token x (B, d) with this block's running state (evaluation: no dropout)."""
        attended, state = self.self_attn.step(self.self_attn_layer_norm(x), state)
        x = x + attended
        return x + self.mlp(self.final_layer_norm(x)), state


class MuseCoco(nnx.Module):
    """``MuseCocoLMHeadModel``: tokens (and an optional embedded prefix) -> next-token logits."""

    def __init__(self, cfg: MuseCocoConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.embed_scale = math.sqrt(cfg.hidden_size)
        self.embed_tokens = Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=jnp.float32,
            param_dtype=self.dtype,
            rngs=rngs,
        )
        self.layers = stack_modules(
            lambda r: MuseCocoBlock(cfg, rngs=r), cfg.num_hidden_layers, rngs
        )
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=self.dtype)
        self.lm_head = Linear(
            cfg.hidden_size,
            cfg.vocab_size,
            axes=("embed", "vocab"),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.dtype,
            rngs=rngs,
        )

    # -- embeddings ---------------------------------------------------------------------------

    def _scaled(self, tokens: jax.Array, position_ids: jax.Array) -> jax.Array:
        """sqrt(d) * E[tokens] + fairseq positions, in fp32 then cast once to the compute dtype."""
        x = self.embed_tokens(tokens) * jnp.float32(self.embed_scale)
        x = x + fairseq_positions(position_ids, self.cfg.hidden_size, self.cfg.padding_idx)
        return x.astype(self.dtype)

    def embed(
        self, tokens: jax.Array, position_start: int | jax.Array = 0, dropout: Dropout | None = None
    ) -> jax.Array:
        """MuseCoco's ``encode_input_ids(tokens, pos_start)`` (SPEC 4.3): (B, L) -> (B, L, d)."""
        position_ids = fairseq_position_ids(tokens, self.cfg.padding_idx, position_start)
        x = self._scaled(tokens, position_ids)
        return x if dropout is None else dropout(x, self.cfg.dropout)

    # -- the parallel form --------------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        pad_mask: jax.Array | None = None,
        prefix_embeddings: jax.Array | None = None,
        position_start: int | jax.Array = 0,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        return_state: bool = False,
    ) -> jax.Array | tuple[jax.Array, LinearAttentionState]:
        """tokens (B, L); ``pad_mask`` (B, L) bool, True = padded (fairseq convention; default:
        tokens == padding_idx); ``prefix_embeddings`` (B, P, d) put in front unchanged.

        Returns fp32 logits (B, P + L, vocab) and, with ``return_state``, every layer's
        linear-attention state after the last position (leading ``layers`` axis) for
        :meth:`decode_step`. Padded keys add nothing to that state.
        """
        cfg = self.cfg
        if pad_mask is None:
            pad_mask = tokens == cfg.padding_idx
        dropout = Dropout.stream(deterministic, dropout_rng, "musecoco")
        embed_key = layer_keys = None
        if dropout.active:
            embed_key, layers_key = jax.random.split(dropout_rng)
            # one key per layer: the scanned body is traced once, so its call sites cannot count
            layer_keys = jax.random.split(layers_key, cfg.num_hidden_layers)
        x = self.embed(tokens, position_start, Dropout(embed_key))
        key_mask = ~pad_mask
        if prefix_embeddings is not None:
            x = jnp.concatenate([prefix_embeddings.astype(self.dtype), x], axis=1)
            prefix_keys = jnp.ones(prefix_embeddings.shape[:2], bool)
            key_mask = jnp.concatenate([prefix_keys, key_mask], axis=1)
        x = constrain(x, *ACTIVATION_AXES)

        def run_block(
            block: MuseCocoBlock, h: jax.Array, key: jax.Array | None
        ) -> tuple[jax.Array, LinearAttentionState]:
            return block(h, key_mask, Dropout(key))

        x, states = scan_modules(self.layers, x, run_block, layer_keys, per_layer=True)
        logits = self.logits(x)
        return (logits, states) if return_state else logits

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final LayerNorm and the untied head: (..., d) -> fp32 (..., vocab)."""
        h = self.layer_norm(hidden)
        # fp32 output straight from the matmul: bf16 logits would round the loss's inputs
        return jnp.matmul(
            h, self.lm_head.kernel[...].astype(h.dtype), preferred_element_type=jnp.float32
        )

    # -- the recurrent form -------------------------------------------------------------------

    def empty_state(self, batch: int) -> LinearAttentionState:
        """Every layer's empty linear-attention state (fp32, leading ``layers`` axis)."""
        heads, head_dim = self.cfg.num_attention_heads, self.cfg.head_dim
        one = LinearAttentionState.empty(batch, heads, head_dim, head_dim)
        return jax.tree.map(
            lambda a: jnp.broadcast_to(a, (self.cfg.num_hidden_layers, *a.shape)), one
        )

    def decoding_layers(self) -> list[MuseCocoBlock]:
        """The blocks as :meth:`decode_step` runs them fastest, made once per sampler: unstacked
        (``layers.stack``: no per-token copy of each layer's kernels) and, with fp32 kernels, LoRA
        merged into the base (fewer small matmuls; in fp32 the merge changes only rounding, in
        bf16 it would round the adapter's delta, so bf16 kept unmerged)."""
        blocks = unstack_modules(self.layers)
        if self.dtype == jnp.float32:
            blocks = [merge_lora(block) for block in blocks]
        return blocks

    def decode_step(
        self,
        token: jax.Array,
        state: LinearAttentionState | list[LinearAttentionState],
        position: jax.Array,
        position_start: int | jax.Array = 0,
        layers: list[MuseCocoBlock] | None = None,
    ) -> tuple[jax.Array, LinearAttentionState | list[LinearAttentionState]]:
        """One new token per row: ``token`` (B,) at token index ``position`` (B,) or () of the
        sequence :meth:`__call__` was given (prefix not counted), ``state`` from
        :meth:`__call__` (``return_state``) or :meth:`empty_state`. Returns fp32 logits (B, vocab)
        and the advanced state. Equal to the parallel form's row at that position.

        ``layers`` (from :meth:`decoding_layers`): run those blocks instead of the stacked ones;
        ``state`` is then a list of per-layer states (``layers.unstack``) and comes back as one."""
        cfg = self.cfg
        position = jnp.broadcast_to(jnp.asarray(position), token.shape)
        position_ids = jnp.where(
            position >= position_start,
            position - position_start + cfg.padding_idx + 1,
            cfg.padding_idx,
        )
        x = self._scaled(token, position_ids)

        def run_block(
            block: MuseCocoBlock, h: jax.Array, layer_state: LinearAttentionState
        ) -> tuple[jax.Array, LinearAttentionState]:
            return block.step(h, layer_state)

        blocks = self.layers if layers is None else layers
        x, state = scan_modules(blocks, x, run_block, state, per_layer=True)
        return self.logits(x), state


CHECKPOINT_KIND = "musecoco checkpoint"


def save_musecoco(path: str | os.PathLike, model: MuseCoco, *, overwrite: bool = False) -> Path:
    """Writes a model (parameters + its config section) as a bossa-jax checkpoint."""
    config = {CONFIG_SECTION: dataclasses.asdict(model.cfg)}
    return checkpoint.save_module(path, model, config, kind=CHECKPOINT_KIND, overwrite=overwrite)


def load_musecoco(path: str | os.PathLike, *, mesh: Mesh | None = None) -> MuseCoco:
    """Restores a checkpoint written by :func:`save_musecoco` / ``python -m convert.musecoco``.
    ``mesh`` (inside ``sharding.use_mesh``): restored straight into the declared shardings, each
    device reading only its shards (``checkpoint.load_module``)."""
    cfg = checkpoint.read_section(path, CONFIG_SECTION, MuseCocoConfig)
    return checkpoint.load_module(path, lambda: MuseCoco(cfg, rngs=nnx.Rngs(0)), mesh=mesh)
