"""models/musicgen.py against HF MusicGen computed exactly as BOSSA does (SPEC 1.2, 1.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
)

from bossa_jax.config import MusicgenConfig as BossaMusicgenConfig
from bossa_jax.models.musicgen import (
    MusicgenFeatures,
    apply_features,
    delay_pattern,
    forward_flops,
)
from convert.musicgen import convert_musicgen

SPECIAL = 2048
FULL_LAYERS, KEEP = 4, 3
_apply = jax.jit(apply_features, static_argnums=0)


def run(model: MusicgenFeatures, codes) -> np.ndarray:
    """The functional jitted path (one compile per structure and shape, shared across tests)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, jnp.asarray(codes)))


def hf_configs(num_layers: int) -> MusicgenConfig:
    """A tiny MusicgenForConditionalGeneration config: 4 codebooks of 2048 (+ special 2048)."""
    decoder = MusicgenDecoderConfig(
        vocab_size=2048,
        hidden_size=32,
        num_attention_heads=4,
        ffn_dim=64,
        num_hidden_layers=num_layers,
        num_codebooks=4,
        dropout=0.0,
    )
    text = T5Config(vocab_size=32, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    codec = EncodecConfig(
        num_filters=4,
        hidden_size=16,
        codebook_size=2048,
        codebook_dim=16,
        num_lstm_layers=1,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        normalize=False,
    )
    return MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerNorms too), so a swapped or skipped weight shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="module")
def hf_full():
    """The 'pretrained' 4-block model whose checkpoint BOSSA truncates."""
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(hf_configs(FULL_LAYERS)).eval()
    randomize(model)
    return model


@pytest.fixture(scope="module")
def hf_truncated(hf_full):
    """SPEC 1.3: config.decoder.num_hidden_layers = keep, then the full checkpoint is loaded."""
    model = MusicgenForConditionalGeneration(hf_configs(KEEP)).eval()
    missing, unexpected = model.load_state_dict(hf_full.state_dict(), strict=False)
    assert not missing
    assert all(f"layers.{i}." in k for k in unexpected for i in [KEEP])
    return model


def reference_pattern(codes: np.ndarray, special: int = SPECIAL) -> np.ndarray:
    """SPEC 1.2 written out: step 0 special; step s >= 1 of codebook q holds codes[q, s-1-q]."""
    b, k, t = codes.shape
    out = np.full((b, k, t + k), special, dtype=codes.dtype)
    for s in range(1, t + k):
        for q in range(k):
            if 0 <= s - 1 - q < t:
                out[:, q, s] = codes[:, q, s - 1 - q]
    return out


def bossa_reference(hf: MusicgenForConditionalGeneration, codes: np.ndarray, *, cond: bool = True):
    """model_blip2.py's audio path: pattern, unconditional inputs through enc_to_dec_proj times the
    zero mask, truncated MusicgenModel, last_hidden_state (final LayerNorm included)."""
    pattern = torch.from_numpy(reference_pattern(codes)).long()
    b, k, s = pattern.shape
    kwargs = {}
    if cond:
        uncond = hf.get_unconditional_inputs(num_samples=b)
        mask = uncond.attention_mask
        states = hf.enc_to_dec_proj(uncond.encoder_outputs[0]) * mask[..., None]
        kwargs = dict(encoder_hidden_states=states, encoder_attention_mask=mask)
    with torch.no_grad():
        out = hf.decoder.model(input_ids=pattern.reshape(b * k, s), **kwargs)
    return out.last_hidden_state.numpy()


def random_codes(batch: int, frames: int, valid: int | None = None, seed: int = 0) -> np.ndarray:
    codes = np.random.default_rng(seed).integers(0, 2048, (batch, 4, frames)).astype(np.int32)
    if valid is not None:
        codes[:, :, valid:] = SPECIAL  # right padding as pad_codes does
    return codes


def test_delay_pattern_matches_spec():
    codes = random_codes(3, 9)
    got = np.asarray(jax.jit(delay_pattern, static_argnums=1)(codes, SPECIAL))
    want = reference_pattern(codes)
    assert got.shape == (3, 4, 13)
    np.testing.assert_array_equal(got, want)
    assert (got[:, :, 0] == SPECIAL).all()
    # codebook q starts at step 1 + q and ends at step T + q
    for q in range(4):
        np.testing.assert_array_equal(got[:, q, 1 + q : 10 + q], codes[:, q])


def test_cross_attention_with_unconditional_inputs_adds_exactly_zero(hf_truncated):
    codes = random_codes(2, 10)
    with_cond = bossa_reference(hf_truncated, codes, cond=True)
    without = bossa_reference(hf_truncated, codes, cond=False)
    assert np.isfinite(with_cond).all()
    np.testing.assert_array_equal(with_cond, without)


@pytest.fixture(scope="module")
def converted(hf_full):
    return convert_musicgen(
        hf_full.state_dict(), keep_layers=KEEP, hf_config=hf_full.config.to_dict()
    )


@pytest.mark.parametrize("valid", [None, 7])
def test_features_match_hf_reference(hf_truncated, converted, valid):
    codes = random_codes(2, 12, valid=valid, seed=1)
    want = bossa_reference(hf_truncated, codes)
    got = run(converted, codes)
    assert got.shape == (2, 16, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_feature_is_final_layer_norm_of_block_keep(hf_full, converted):
    """SPEC 1.3: final LN(hidden_states[keep]) of the full model, not the raw block output."""
    codes = random_codes(2, 12, seed=2)
    pattern = torch.from_numpy(reference_pattern(codes)).long().reshape(8, -1)
    with torch.no_grad():
        out = hf_full.decoder.model(input_ids=pattern, output_hidden_states=True)
        block = out.hidden_states[KEEP]
        want = hf_full.decoder.model.decoder.layer_norm(block).numpy()
    got = run(converted, codes)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - block.numpy()).max() > 1e-2


def test_bfloat16_params_and_compute(hf_full, converted):
    model16 = convert_musicgen(
        hf_full.state_dict(), keep_layers=KEEP, hf_config=hf_full.config.to_dict(), dtype="bfloat16"
    )
    assert model16.layers.self_attn.q_proj.kernel.dtype == jnp.bfloat16
    assert model16.embed_tokens.embedding.dtype == jnp.bfloat16
    codes = random_codes(2, 12, seed=4)
    graphdef, state = nnx.split(model16)
    got = _apply(graphdef, state, jnp.asarray(codes))
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - run(converted, codes))
    assert err.mean() < 0.03 and err.max() < 0.3


def test_stacked_parameters_and_config():
    cfg = BossaMusicgenConfig(
        hidden_size=16, num_attention_heads=2, ffn_dim=32, num_hidden_layers=6, keep_layers=5
    )
    model = nnx.eval_shape(lambda: MusicgenFeatures(cfg, rngs=nnx.Rngs(0)))
    assert model.layers.mlp.fc1.kernel.shape == (5, 16, 32)
    assert model.layers.self_attn.q_proj.bias is None and model.layers.mlp.fc1.bias is None
    assert model.embed_tokens.embedding.shape == (4 * 2049, 16)  # 4 codebook tables, stacked


def test_forward_flops_against_xla_cost_analysis():
    """Matmul FLOPs by formula vs XLA's count for one block (XLA adds a little elementwise work)."""
    cfg = BossaMusicgenConfig(
        hidden_size=256, num_attention_heads=4, ffn_dim=1024, num_hidden_layers=1, keep_layers=1
    )
    model = nnx.eval_shape(lambda: MusicgenFeatures(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    codes = jax.ShapeDtypeStruct((2, 4, 124), jnp.int32)
    compiled = jax.jit(apply_features, static_argnums=0).lower(graphdef, state, codes).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    xla = analysis["flops"]
    formula = forward_flops(cfg, batch=2, steps=128)
    assert formula == 1 * 2 * 128 * (8 * 256**2 + 4 * 256 * 1024 + 4 * 128 * 256)
    assert formula <= xla <= 1.15 * formula, (formula, xla)
