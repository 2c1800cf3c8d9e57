"""EnCodec-32kHz encoder vs HF ``transformers.EncodecModel`` (SPEC 1.1): identical codes on real
music, pre-quantisation embeddings within 1e-4, HF's frame count and padding rules on odd lengths,
the conv-shortcut / causal / multi-residual variants, bf16 compute, parameter axis names."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import EncodecConfig as HFEncodecConfig
from transformers import EncodecModel

from bossa_jax.assets import DEMO_STYLE
from bossa_jax.audio import load_clip
from bossa_jax.models.encodec import EncodecEncoder, encode_fn
from convert.encodec import convert_encodec

TOL = 1e-4


def tiny_hf_config(**overrides) -> HFEncodecConfig:
    """The encodec_32khz layout (ratios 8,5,4,4, mono, 2048-entry codebooks, 2.2 kbps -> 4
    codebooks, non-causal, reflect, identity skips) with small widths."""
    fields = dict(
        sampling_rate=32000,
        audio_channels=1,
        num_filters=4,
        hidden_size=16,
        upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048,
        target_bandwidths=[2.2],
        use_causal_conv=False,
        use_conv_shortcut=False,
        pad_mode="reflect",
        normalize=False,
        chunk_length_s=None,
    )
    fields.update(overrides)
    return HFEncodecConfig(**fields)


def tiny_hf_model(seed: int = 0, **overrides) -> EncodecModel:
    """A random HF EncodecModel whose weights (weight-norm g and v, LSTM, codebooks) all differ
    from their init, so the codes it produces are far from trivial."""
    torch.manual_seed(seed)
    model = EncodecModel(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("original0"):  # weight-norm magnitude g
                param.copy_(0.5 + torch.rand_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
        # codewords spread like the embeddings (of a test tone), residual codebooks ever finer,
        # as a trained RVQ has them: every codebook then sees many distinct nearest codewords
        t = torch.arange(16000) / 32000
        tone = (0.3 * torch.sin(2 * math.pi * 220 * t) * torch.sin(2 * math.pi * 3 * t))[None, None]
        emb = model.encoder(tone)[0].T
        mean, std = emb.mean(0), emb.std(0)
        for k, layer in enumerate(model.quantizer.layers):
            noise = torch.randn_like(layer.codebook.embed) * std * 2.0 * 0.5**k
            layer.codebook.embed.copy_(noise + (mean if k == 0 else 0))
    return model


def hf_outputs(model: EncodecModel, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (B, T, D), codes (B, K, T)) from HF for (B, samples) audio."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(audio, np.float32))[:, None]
        embeddings = model.encoder(x).numpy().transpose(0, 2, 1)
        codes = model.encode(x).audio_codes[0].numpy()
    return embeddings, codes


@functools.partial(jax.jit, static_argnums=0)
def _embed_and_quantize(graphdef, state, audio):
    model = nnx.merge(graphdef, state)
    embeddings = model.embed(audio)
    return embeddings, model.quantize(embeddings)


def flax_outputs(model: EncodecEncoder, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, codes) in one compiled call (one compile per audio shape)."""
    embeddings, codes = _embed_and_quantize(*nnx.split(model), jnp.asarray(audio))
    return np.asarray(embeddings), np.asarray(codes)


@pytest.fixture(scope="module")
def music() -> np.ndarray:
    """Two 5 s excerpts of the demo style reference (real music), as a batch (2, 160000)."""
    a = load_clip(DEMO_STYLE, 6.0, clip_frames=250).samples
    b = load_clip(DEMO_STYLE, 18.0, clip_frames=250).samples
    return np.stack([a, b])


@pytest.fixture(scope="module")
def pair() -> tuple[EncodecModel, EncodecEncoder]:
    hf = tiny_hf_model(0)
    return hf, convert_encodec(hf.state_dict())


def test_codes_identical_to_hf_on_music(pair, music):
    hf, model = pair
    assert model.cfg.num_codebooks == 4 and model.cfg.codebook_size == 2048
    want_emb, want_codes = hf_outputs(hf, music)
    emb, codes = flax_outputs(model, music)
    assert emb.shape == (2, 250, 16) and codes.shape == (2, 4, 250) and codes.dtype == np.int32
    assert np.abs(emb - want_emb).max() <= TOL
    # non-trivial codes: many distinct codewords in every codebook, clips differ
    assert all(len(np.unique(codes[:, k])) > 40 for k in range(4))
    assert (codes[0] != codes[1]).mean() > 0.5
    np.testing.assert_array_equal(codes, want_codes)


@pytest.mark.parametrize("samples", [50, 7001])
def test_frame_count_and_padding_match_hf_on_odd_lengths(pair, music, samples):
    """ceil(samples / 640) frames; short inputs exercise HF's zero-extended reflect padding."""
    hf, model = pair
    audio = music[:1, 32000 : 32000 + samples]
    want_emb, want_codes = hf_outputs(hf, audio)
    emb, codes = flax_outputs(model, audio)
    assert codes.shape == (1, 4, math.ceil(samples / 640))
    assert np.abs(emb - want_emb).max() <= TOL
    np.testing.assert_array_equal(codes, want_codes)


def test_conv_shortcut_causal_constant_pad_two_residual_layers(music):
    """The config switches the 32 kHz model leaves off still follow HF (dilation growth 1, 3)."""
    hf = tiny_hf_model(
        1,
        use_conv_shortcut=True,
        use_causal_conv=True,
        pad_mode="constant",
        num_residual_layers=2,
        dilation_growth_rate=3,
        compress=4,
        num_filters=8,
    )
    model = convert_encodec(hf.state_dict(), config=None)
    cfg = model.cfg
    assert cfg.use_conv_shortcut and cfg.num_residual_layers == 2 and cfg.compress == 4
    # shapes cannot tell causality, padding or dilation growth: give them as the HF config has
    from convert.encodec import config_from_hf

    model = convert_encodec(hf.state_dict(), config=config_from_hf(hf.config.to_dict(), source="t"))
    audio = music[:, :9000]
    want_emb, want_codes = hf_outputs(hf, audio)
    emb, codes = flax_outputs(model, audio)
    assert np.abs(emb - want_emb).max() <= TOL
    np.testing.assert_array_equal(codes, want_codes)


def test_bfloat16_compute(pair, music):
    """bf16 input and compute: same shapes, embeddings near the fp32 ones, quantiser in fp32."""
    hf, model = pair
    abstract = nnx.eval_shape(
        lambda: EncodecEncoder(model.cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    bf16 = nnx.merge(nnx.graphdef(abstract), nnx.state(model))
    audio = music[:, :12800]
    emb16, codes16 = flax_outputs(bf16, jnp.asarray(audio, jnp.bfloat16))
    emb32, _ = hf_outputs(hf, audio)
    assert emb16.dtype == jnp.bfloat16 and codes16.shape == (2, 4, 20)
    emb16 = emb16.astype(np.float32)
    rel = np.linalg.norm(emb16 - emb32) / np.linalg.norm(emb32)
    assert rel < 0.05, rel


def test_parameters_carry_logical_axes(pair):
    _, model = pair
    axes = {
        ".".join(map(str, path)): var.get_metadata().get("out_sharding")
        for path, var in nnx.iter_graph(model)
        if isinstance(var, nnx.Param)
    }
    assert axes["conv_in.kernel"] == (None, "conv_in", "conv_out")
    assert axes["stages.3.down.bias"] == ("conv_out",)
    assert axes["codebooks"] == ("codebook", None, None)
    assert axes["lstm.1.recurrent.kernel"] == ("feature", None)
    assert all(v is not None for v in axes.values()), axes


def test_encode_fn_functional_form(pair, music):
    hf, model = pair
    audio = music[:1, :6400]
    codes = encode_fn(*nnx.split(model), jnp.asarray(audio))
    assert codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes), hf_outputs(hf, audio)[1])
