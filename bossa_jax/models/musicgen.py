"""The frozen MusicGen decoder cut after ``keep_layers`` blocks: EnCodec codes -> audio features
(SPEC 1.2, 1.3; DESIGN "Scan over layers", "Attention").

* :func:`delay_pattern` builds the input pattern by hand as the official code does (SPEC 1.2):
  codes (B, 4, T) -> (B, 4, T + 4); step 0 is the special id for every codebook, step s >= 1 of
  codebook q holds ``codes[q, s - 1 - q]`` where that index is valid, else the special id.
* The codebooks are embedded by summing four tables of (vocab_size + 1) x d rows (row vocab_size =
  the special id; stored as one (4 * (vocab_size + 1), d) table), plus HF MusicGen's sinusoidal
  positions 0..S-1 (cos half first, no offset, no embedding scale).
* Blocks are pre-LN, without biases: x + SelfAttn(LN(x)) (causal), then x + FFN(LN(x)) with exact
  (erf) GELU; LayerNorm eps 1e-5. Only the first ``keep_layers`` blocks exist; their parameters are
  stacked on a leading ``layers`` axis and run with ``lax.scan``.
* The feature is MusicGen's own final LayerNorm applied to the output of the last kept block
  (SPEC 1.3: ``MusicgenModel(...)[0]`` of the truncated model), not the raw block output.
* Cross-attention is left out: BOSSA feeds the unconditional text state (zeros through
  ``enc_to_dec_proj``, multiplied by an all-zero mask), so its keys and values are exactly zero and,
  without biases, every cross-attention sub-block adds exactly zero (SPEC 1.2; proven against HF in
  tests/models/test_musicgen.py).

Frozen: nothing here is trainable in BOSSA; ``cfg.dtype`` sets both the parameter and the compute
dtype (bf16 in production; LayerNorm statistics and the embedding sum stay fp32).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from bossa_jax import checkpoint
from bossa_jax.config import MusicgenConfig
from bossa_jax.errors import CheckpointError, ConfigError
from bossa_jax.layers import (
    MLP,
    Attention,
    Embed,
    LayerNorm,
    musicgen_positions,
    scan_modules,
    stack_modules,
)
from bossa_jax.sharding import constrain

ACTIVATION_AXES = ("batch", "length", "embed")
CONFIG_SECTION = "musicgen"


def delay_pattern(codes: jax.Array, special_id: int) -> jax.Array:
    """audiocraft's ``DelayedPatternProvider(delays=[0..K-1])`` with ``keep_only_valid_steps=False``
    as BOSSA calls it (SPEC 1.2): (B, K, T) integer codes -> (B, K, T + K), jittable."""
    num_codebooks = codes.shape[1]
    rows = [
        jnp.pad(
            codes[:, q],
            ((0, 0), (1 + q, num_codebooks - 1 - q)),
            constant_values=special_id,
        )
        for q in range(num_codebooks)
    ]
    return jnp.stack(rows, axis=1)


class MusicgenBlock(nnx.Module):
    """One pre-LN decoder block without cross-attention (HF ``MusicgenDecoderLayer`` names)."""

    def __init__(self, cfg: MusicgenConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        self.self_attn_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(
            d,
            cfg.num_attention_heads,
            use_bias=False,
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(
            d, cfg.ffn_dim, act="gelu", use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        attended, _ = self.self_attn(self.self_attn_layer_norm(x), is_causal=True)
        x = constrain(x + attended, *ACTIVATION_AXES)
        x = x + self.mlp(self.final_layer_norm(x))
        return constrain(x, *ACTIVATION_AXES)


class MusicgenFeatures(nnx.Module):
    """Codes (B, 4, T) -> features (B, T + 4, d): the truncated, frozen MusicGen decoder."""

    def __init__(self, cfg: MusicgenConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        # the codebooks' tables, one after another: row q * (vocab_size + 1) + code. One table
        # means one gather; its rows are a codebook's entries, never split over devices.
        self.embed_tokens = Embed(
            cfg.num_codebooks * (cfg.vocab_size + 1),
            cfg.hidden_size,
            axes=("codebook", "embed"),
            dtype=jnp.float32,
            param_dtype=self.dtype,
            rngs=rngs,
        )
        self.layers = stack_modules(lambda r: MusicgenBlock(cfg, rngs=r), cfg.keep_layers, rngs)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, codes: jax.Array) -> jax.Array:
        """EnCodec codes (B, 4, T) in [0, vocab_size] -> (B, T + 4, d) in ``cfg.dtype``."""
        return self.from_pattern(delay_pattern(codes, self.cfg.special_id))

    def from_pattern(self, pattern: jax.Array) -> jax.Array:
        """An already delayed pattern (B, 4, S) -> (B, S, d)."""
        steps = pattern.shape[-1]
        offsets = jnp.arange(self.cfg.num_codebooks, dtype=pattern.dtype) * (
            self.cfg.vocab_size + 1
        )
        # fp32 sum of the codebook lookups plus positions, cast once to the compute dtype
        x = jnp.sum(self.embed_tokens(pattern + offsets[:, None]), axis=1)
        x = x + musicgen_positions(steps, self.cfg.hidden_size)
        x = constrain(x.astype(self.dtype), *ACTIVATION_AXES)
        x = scan_modules(self.layers, x, lambda block, h: block(h))
        return constrain(self.layer_norm(x), *ACTIVATION_AXES)


def apply_features(graphdef: nnx.GraphDef, state: nnx.State, codes: jax.Array) -> jax.Array:
    """The functional path for ``jax.jit``: split the model once with ``nnx.split``, then call this
    with the state as an argument (the merge happens inside the trace)."""
    return nnx.merge(graphdef, state)(codes)


def forward_flops(cfg: MusicgenConfig, batch: int, steps: int) -> int:
    """Matmul FLOPs of one forward pass over ``steps`` pattern steps (2 per multiply-add).

    Per block and token: q/k/v/out projections 8 d^2, FFN 4 d f, and attention scores plus
    weighted values 4 S d, counted over the full S x S matrix as XLA and cuDNN compute it
    (the PaLM convention for model FLOPs). Embedding lookups and norms are not matmuls.
    """
    d, f = cfg.hidden_size, cfg.ffn_dim
    per_token = 8 * d * d + 4 * d * f + 4 * steps * d
    return cfg.keep_layers * batch * steps * per_token


CHECKPOINT_KIND = "musicgen checkpoint"


def save_musicgen(
    path: str | os.PathLike, model: MusicgenFeatures, *, overwrite: bool = False
) -> Path:
    """Writes a converted model (parameters + its config) as a bossa-jax checkpoint."""
    config = {CONFIG_SECTION: dataclasses.asdict(model.cfg)}
    return checkpoint.save_module(path, model, config, kind=CHECKPOINT_KIND, overwrite=overwrite)


def load_musicgen(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    keep_layers: int | None = None,
    mesh: Mesh | None = None,
) -> MusicgenFeatures:
    """Restores a checkpoint written by ``python -m convert.musicgen``.

    ``dtype`` overrides the stored parameter/compute dtype (the restore casts); ``keep_layers``,
    when given, must equal the stored block count.
    ``mesh`` (inside ``sharding.use_mesh``): restored straight into the declared shardings, each
    device reading only its shards (``checkpoint.load_module``).
    """
    cfg = checkpoint.read_section(path, CONFIG_SECTION, MusicgenConfig)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
        try:
            cfg.validate(CONFIG_SECTION)
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from err
    if keep_layers is not None and keep_layers != cfg.keep_layers:
        raise CheckpointError(
            f"{path}: holds {cfg.keep_layers} MusicGen blocks, but {keep_layers} are configured "
            "(musicgen.keep_layers)"
        )
    return checkpoint.load_module(path, lambda: MusicgenFeatures(cfg, rngs=nnx.Rngs(0)), mesh=mesh)
