"""convert/musicgen.py: HF and audiocraft layouts -> MusicgenFeatures, round trip, bad checkpoints.

The audiocraft references are audiocraft 1.3.0's own ``StreamingTransformer`` and
``DelayedPatternProvider``. audiocraft pins torch 2.1 and pulls a large tree, so it is not a
declared dependency: install it with ``pip install --no-deps audiocraft==1.3.0`` (plus ``einops``);
its modules are imported here without running the package ``__init__`` (which needs spacy, flashy,
...) and with a stub ``xformers.ops`` that forwards to torch (the torch attention backend needs only
``unbind`` and the ``LowerTriangularMask`` marker from it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MusicgenForCausalLM, MusicgenForConditionalGeneration

from bossa_jax.errors import CheckpointError
from bossa_jax.models.musicgen import delay_pattern
from convert.common import param_paths
from convert.musicgen import (
    convert_musicgen,
    load_musicgen,
    main,
    to_hf_state_dict,
)
from tests.models.test_musicgen import (
    FULL_LAYERS,
    KEEP,
    bossa_reference,
    hf_configs,
    random_codes,
    randomize,
    run,
)


@pytest.fixture(scope="module")
def hf_full():
    torch.manual_seed(1)
    model = MusicgenForConditionalGeneration(hf_configs(FULL_LAYERS)).eval()
    randomize(model, seed=1)
    return model


@pytest.fixture(scope="module")
def hf_truncated(hf_full):
    model = MusicgenForConditionalGeneration(hf_configs(KEEP)).eval()
    model.load_state_dict(hf_full.state_dict(), strict=False)
    return model


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- HF layouts


def test_round_trip_through_hf_layout(hf_full, hf_truncated):
    """Flax -> to_hf_state_dict -> a fresh truncated HF model reproduces the reference."""
    model = convert_musicgen(_state(hf_full), keep_layers=KEEP, hf_config=hf_full.config.to_dict())
    exported = to_hf_state_dict(model)
    fresh = MusicgenForConditionalGeneration(hf_configs(KEEP)).eval()
    missing, unexpected = fresh.load_state_dict(
        {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False
    )
    assert not unexpected
    # what is not exported is exactly what BOSSA's features never use
    assert missing and all(
        ".encoder_attn" in k
        or k.startswith(("text_encoder.", "audio_encoder.", "enc_to_dec_proj."))
        or k.startswith("decoder.lm_heads.")
        for k in missing
    )
    codes = random_codes(2, 12, valid=8, seed=5)
    want = bossa_reference(hf_truncated, codes)
    np.testing.assert_allclose(bossa_reference(fresh, codes), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run(model, codes), want, atol=1e-4, rtol=0)
    original = _state(hf_full)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key])


def test_hf_directory_and_causal_lm_layouts(tmp_path, hf_full, hf_truncated):
    codes = random_codes(2, 12, seed=6)
    want = bossa_reference(hf_truncated, codes)
    hf_full.save_pretrained(tmp_path / "cond")
    from_dir = convert_musicgen(tmp_path / "cond", keep_layers=KEEP)
    assert from_dir.cfg.num_hidden_layers == FULL_LAYERS and from_dir.cfg.num_attention_heads == 4
    np.testing.assert_allclose(run(from_dir, codes), want, atol=1e-4, rtol=0)

    causal = MusicgenForCausalLM(hf_full.config.decoder).eval()
    causal.load_state_dict(hf_full.decoder.state_dict())
    state = _state(causal)
    assert "model.decoder.embed_tokens.0.weight" in state
    from_causal = convert_musicgen(state, keep_layers=KEEP, num_heads=4)
    np.testing.assert_allclose(run(from_causal, codes), want, atol=1e-4, rtol=0)


def test_command_writes_a_checkpoint_load_musicgen_restores(tmp_path, hf_full, hf_truncated):
    hf_full.save_pretrained(tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--keep-layers", str(KEEP)]) == 0
    model = load_musicgen(tmp_path / "out")
    codes = random_codes(2, 12, seed=7)
    want = bossa_reference(hf_truncated, codes)
    np.testing.assert_allclose(run(model, codes), want, atol=1e-4, rtol=0)
    half = load_musicgen(tmp_path / "out", dtype="bfloat16")
    assert half.layers.mlp.fc1.kernel.dtype == jnp.bfloat16
    assert run(half, codes).dtype == jnp.bfloat16
    with pytest.raises(CheckpointError, match="holds 3 MusicGen blocks"):
        load_musicgen(tmp_path / "out", keep_layers=25)


# ------------------------------------------------------------------------------- bad inputs


def test_wrong_shape_is_named(hf_full):
    state = _state(hf_full)
    key = "decoder.model.decoder.layers.1.fc1.weight"
    state[key] = np.zeros((65, 32), np.float32)
    with pytest.raises(
        CheckpointError, match=rf"shape mismatch for '{key}'.*\(64, 32\).*\(65, 32\)"
    ):
        convert_musicgen(state, keep_layers=KEEP, num_heads=4)


def test_unexpected_and_missing_keys_are_named(hf_full):
    state = _state(hf_full)
    state["decoder.model.decoder.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*layers\.0\.self_attn\.rotary"):
        convert_musicgen(state, keep_layers=KEEP, num_heads=4)
    state = _state(hf_full)
    del state["decoder.model.decoder.layers.2.self_attn.v_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing key '.*layers\.2\.self_attn\.v_proj"):
        convert_musicgen(state, keep_layers=KEEP, num_heads=4)
    with pytest.raises(CheckpointError, match="neither an HF MusicGen"):
        convert_musicgen({"foo.weight": np.zeros(2)}, keep_layers=1)


def test_keep_layers_beyond_source_is_an_error(hf_full):
    with pytest.raises(CheckpointError, match="keep_layers"):
        convert_musicgen(_state(hf_full), keep_layers=FULL_LAYERS + 1, num_heads=4)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        convert_musicgen(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        convert_musicgen(tmp_path / "nope.bin")


# ------------------------------------------------------------------------------- audiocraft


@pytest.fixture(scope="module")
def audiocraft():
    """audiocraft.modules.{transformer,codebooks_patterns} without the package __init__."""
    spec = importlib.util.find_spec("audiocraft")
    if spec is None or importlib.util.find_spec("einops") is None:
        pytest.skip(
            "audiocraft 1.3.0 not installed (pip install --no-deps audiocraft==1.3.0 einops)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("audiocraft")
    package.__path__ = [str(root)]
    modules = types.ModuleType("audiocraft.modules")
    modules.__path__ = [str(root / "modules")]
    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.unbind = torch.unbind
    ops.LowerTriangularMask = type("LowerTriangularMask", (), {})
    ops.memory_efficient_attention = None  # only the torch backend is used
    xformers.ops = ops
    stubs = {
        "audiocraft": package,
        "audiocraft.modules": modules,
        "xformers": xformers,
        "xformers.ops": ops,
    }
    # the stubs stay while this module's tests run: audiocraft imports xformers.ops lazily too
    with mock.patch.dict(sys.modules, stubs):
        transformer = importlib.import_module("audiocraft.modules.transformer")
        patterns = importlib.import_module("audiocraft.modules.codebooks_patterns")
        assert transformer._efficient_attention_backend == "torch"
        yield types.SimpleNamespace(transformer=transformer, patterns=patterns)


def test_delay_pattern_matches_audiocraft_provider(audiocraft):
    codes = random_codes(2, 11, seed=8)
    provider = audiocraft.patterns.DelayedPatternProvider(n_q=4, delays=[0, 1, 2, 3])
    pattern = provider.get_pattern(codes.shape[-1])
    want, _, _ = pattern.build_pattern_sequence(
        torch.from_numpy(codes).long(), special_token=2048, keep_only_valid_steps=False
    )
    got = np.asarray(delay_pattern(jnp.asarray(codes), 2048))
    np.testing.assert_array_equal(got, want.numpy())


def _audiocraft_lm(audiocraft, num_layers: int, seed: int = 0):
    """MusicGen's LM body as audiocraft builds it (musicgen_lm.yaml: memory_efficient, no biases,
    norm_first, causal, cross-attention, sin positions at scale 1), tiny and random."""
    torch.manual_seed(seed)
    body = audiocraft.transformer.StreamingTransformer(
        d_model=32,
        num_heads=4,
        num_layers=num_layers,
        dim_feedforward=64,
        dropout=0.0,
        bias_ff=False,
        bias_attn=False,
        causal=True,
        memory_efficient=True,
        cross_attention=True,
        norm_first=True,
        activation=torch.nn.functional.gelu,
        positional_embedding="sin",
        positional_scale=1.0,
    )
    lm = torch.nn.Module()
    lm.emb = torch.nn.ModuleList([torch.nn.Embedding(2049, 32) for _ in range(4)])
    lm.transformer = body
    lm.out_norm = torch.nn.LayerNorm(32, eps=1e-5)
    lm.linears = torch.nn.ModuleList([torch.nn.Linear(32, 2048, bias=False) for _ in range(4)])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.15 * noise)
    return lm.eval()


def _audiocraft_features(lm, codes: np.ndarray) -> np.ndarray:
    """LMModel.forward up to out_norm, on the delay pattern, with a zero cross-attention source."""
    pattern = torch.from_numpy(np.array(delay_pattern(jnp.asarray(codes), 2048))).long()
    with torch.no_grad():
        x = sum(lm.emb[k](pattern[:, k]) for k in range(4))
        cross = torch.zeros(x.shape[0], 1, x.shape[-1])
        return lm.out_norm(lm.transformer(x, cross_attention_src=cross)).numpy()


def test_audiocraft_lm_converts_and_matches(audiocraft):
    full = _audiocraft_lm(audiocraft, FULL_LAYERS)
    state = _state(full)
    assert "transformer.layers.0.self_attn.in_proj_weight" in state
    assert "transformer.layers.0.cross_attention.in_proj_weight" in state
    assert "transformer.layers.0.norm_cross.weight" in state
    state["condition_provider.conditioners.description.output_proj.weight"] = np.zeros((32, 8))
    codes = random_codes(2, 12, valid=9, seed=9)

    whole = convert_musicgen({"best_state": state}, keep_layers=FULL_LAYERS, num_heads=4)
    np.testing.assert_allclose(
        run(whole, codes), _audiocraft_features(full, codes), atol=1e-4, rtol=0
    )
    truncated = _audiocraft_lm(audiocraft, KEEP, seed=3)
    truncated.load_state_dict(full.state_dict(), strict=False)
    model = convert_musicgen(state, keep_layers=KEEP, fmt="audiocraft", num_heads=4)
    assert (model.cfg.num_hidden_layers, model.cfg.keep_layers) == (FULL_LAYERS, KEEP)
    want = _audiocraft_features(truncated, codes)
    np.testing.assert_allclose(run(model, codes), want, atol=1e-4, rtol=0)


def test_audiocraft_fused_qkv_shape_is_named(audiocraft):
    state = _state(_audiocraft_lm(audiocraft, 2))
    state["transformer.layers.1.self_attn.in_proj_weight"] = np.zeros((90, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.in_proj_weight.*\(96, 32\)"):
        convert_musicgen(state, keep_layers=2, num_heads=4)


# ------------------------------------------------------------------------------- never guess


def test_state_dict_without_config_needs_num_heads(tmp_path, hf_full, hf_truncated):
    """No config.json and no --num-heads: refused (the old default of 64-wide heads would have
    built 1 head here and wrong features); with --num-heads 4 it matches HF."""
    from safetensors.numpy import save_file

    source = tmp_path / "model.safetensors"  # a bare state dict, no config.json beside it
    save_file(_state(hf_full), str(source))
    with pytest.raises(CheckpointError, match=r"head count: pass --num-heads"):
        convert_musicgen(source, keep_layers=KEEP)
    with pytest.raises(CheckpointError, match=r"--num-heads"):
        main([str(source), str(tmp_path / "out"), "--keep-layers", str(KEEP)])
    assert not (tmp_path / "out").exists()
    model = convert_musicgen(source, keep_layers=KEEP, num_heads=4)
    codes = random_codes(2, 12, seed=9)
    want = bossa_reference(hf_truncated, codes)
    np.testing.assert_allclose(run(model, codes), want, atol=1e-4, rtol=0)


def test_num_heads_contradicting_config_json_is_an_error(tmp_path, hf_full):
    hf_full.save_pretrained(tmp_path / "src")
    with pytest.raises(CheckpointError, match="contradicts config.json"):
        convert_musicgen(tmp_path / "src", keep_layers=KEEP, num_heads=2)


def test_official_bossa_stage1_layout_equals_hf_layout(tmp_path, hf_full):
    """``musicgen_decoder.decoder.*`` (the released stage-1 file, SPEC 7) converts to the same
    parameters as the HF layout; the rest of the BOSSA model in the file is ignored."""
    decoder = hf_full.decoder.model.decoder.state_dict()
    official = {f"musicgen_decoder.decoder.{k}": v.numpy().copy() for k, v in decoder.items()}
    official["musicgen_enc_to_dec_proj.weight"] = np.zeros((32, 24), np.float32)
    official["Qformer.bert.embeddings.word_embeddings.weight"] = np.zeros((5, 8), np.float32)
    official["query_tokens"] = np.zeros((1, 2, 8), np.float32)
    official["temp"] = np.float32(0.07)
    path = tmp_path / "bossa_stage1.pt"
    torch.save({k: torch.as_tensor(v) for k, v in official.items()}, path)
    from_official = convert_musicgen(path, keep_layers=KEEP, num_heads=4)
    from_hf = convert_musicgen(
        _state(hf_full), keep_layers=KEEP, hf_config=hf_full.config.to_dict()
    )
    assert from_official.cfg == from_hf.cfg
    want = {k: np.asarray(v[...]) for k, v in param_paths(from_hf).items()}
    got = {k: np.asarray(v[...]) for k, v in param_paths(from_official).items()}
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(CheckpointError, match="--num-heads"):  # the file holds no head count
        convert_musicgen(path, keep_layers=KEEP)


def test_bf16_source_stays_bf16_unless_a_dtype_is_asked(tmp_path, hf_full):
    from safetensors.torch import save_file

    source = tmp_path / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in hf_full.state_dict().items()}, str(source))
    kept = convert_musicgen(source, keep_layers=KEEP, num_heads=4)
    assert kept.cfg.dtype == "bfloat16"
    assert kept.layers.mlp.fc1.kernel.dtype == jnp.bfloat16
    bits = hf_full.state_dict()["decoder.model.decoder.layers.0.fc1.weight"].to(torch.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(kept.layers.mlp.fc1.kernel[...][0], np.float32), bits.float().numpy().T
    )
    asked = convert_musicgen(source, keep_layers=KEEP, num_heads=4, dtype="float32")
    assert asked.cfg.dtype == "float32" and asked.layers.mlp.fc1.kernel.dtype == jnp.float32
