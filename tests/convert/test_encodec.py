"""convert/encodec.py (DESIGN "Converters"): HF directory via the CLI and load_encodec, both
weight-norm layouts, the export round trip through HF ``EncodecModel.load_state_dict``, the
audiocraft format against audiocraft's own SEANetEncoder + ResidualVectorQuantizer, and the
one-line errors for bad checkpoints."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import EncodecModel

from bossa_jax.errors import CheckpointError
from bossa_jax.models.encodec import load_encodec
from convert.encodec import IGNORE_SUFFIXES, convert_encodec, main, to_hf_state_dict
from tests.models.test_encodec import TOL, flax_outputs, hf_outputs, tiny_hf_model


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(2)


@pytest.fixture(scope="module")
def audio():
    """1.2 s of the demo music excerpted at 6 s, as a (1, samples) batch."""
    from bossa_jax.assets import DEMO_STYLE
    from bossa_jax.audio import load_clip

    return load_clip(DEMO_STYLE, 6.0, clip_frames=60).samples[None]


@pytest.fixture(scope="module")
def reference(hf, audio):
    return hf_outputs(hf, audio)


def _legacy(state: dict) -> dict:
    """The Hub files' layout: weight_g / weight_v instead of parametrizations.original0/1."""
    return {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }


def test_hf_directory_through_cli_and_load_encodec(hf, audio, reference, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        from bossa_jax.errors import run_cli

        run_cli(main, [str(tmp_path / "hf"), str(tmp_path / "out")])
    assert exit_info.value.code == 0
    model = load_encodec(tmp_path / "out")
    cfg = model.cfg
    assert (cfg.num_codebooks, cfg.codebook_size, cfg.pad_mode) == (4, 2048, "reflect")
    assert not cfg.use_causal_conv and not cfg.use_conv_shortcut
    emb, codes = flax_outputs(model, audio)
    assert np.abs(emb - reference[0]).max() <= TOL
    np.testing.assert_array_equal(codes, reference[1])


@pytest.mark.parametrize("layout", ["parametrizations", "legacy"])
def test_both_weight_norm_layouts(hf, audio, reference, layout):
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    if layout == "legacy":
        state = _legacy(state)
        assert any(k.endswith(".weight_g") for k in state)
    model = convert_encodec(state, fmt="hf")
    emb, codes = flax_outputs(model, audio)
    assert np.abs(emb - reference[0]).max() <= TOL
    np.testing.assert_array_equal(codes, reference[1])


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_through_hf_load_state_dict(hf, audio, reference, legacy):
    model = convert_encodec(hf.state_dict())
    exported = to_hf_state_dict(model, legacy=legacy)
    if legacy:  # HF modules hold the parametrization layout: rename back as a Hub load would
        exported = {
            k.replace("weight_g", "parametrizations.weight.original0").replace(
                "weight_v", "parametrizations.weight.original1"
            ): v
            for k, v in exported.items()
        }
    torch.manual_seed(123)
    fresh = EncodecModel(hf.config).eval()
    result = fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, False)
    assert not result.unexpected_keys
    assert all(k.startswith("decoder.") or k.endswith(IGNORE_SUFFIXES) for k in result.missing_keys)
    emb, codes = hf_outputs(fresh, audio)
    assert np.abs(emb - reference[0]).max() <= TOL
    np.testing.assert_array_equal(codes, reference[1])


# ---------------------------------------------------------------------------------------------
# audiocraft: its SEANetEncoder and ResidualVectorQuantizer are the reference


def _audiocraft():
    """audiocraft 1.3.0's seanet and vq modules, imported without the package __init__ (which
    pulls in its whole training stack); flashy is only used while training, so it is stubbed."""
    spec = importlib.util.find_spec("audiocraft")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("audiocraft not installed (pip install --no-deps audiocraft==1.3.0)")
    pytest.importorskip("einops")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "flashy" or k.startswith("audiocraft")}
    try:
        for name, path in [
            ("audiocraft", root),
            ("audiocraft.modules", root / "modules"),
            ("audiocraft.quantization", root / "quantization"),
        ]:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
        sys.modules.setdefault("flashy", types.ModuleType("flashy"))
        seanet = importlib.import_module("audiocraft.modules.seanet")
        vq = importlib.import_module("audiocraft.quantization.vq")
    finally:
        for k in [k for k in sys.modules if k == "flashy" or k.startswith("audiocraft")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return seanet, vq


XP_CFG = """
sample_rate: 32000
channels: 1
compression_model: encodec
encodec: {autoencoder: seanet, quantizer: rvq, sample_rate: '${sample_rate}',
          channels: '${channels}', causal: false, renormalize: false}
seanet:
  dimension: 16
  channels: '${channels}'
  causal: '${encodec.causal}'
  n_filters: 4
  n_residual_layers: 1
  ratios: [8, 5, 4, 4]
  activation: ELU
  activation_params: {alpha: 1.0}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: reflect
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder: {trim_right_ratio: 1.0, final_activation: null, final_activation_params: null}
  encoder: {}
rvq: {n_q: 4, q_dropout: false, bins: 2048, decay: 0.99, kmeans_init: true, kmeans_iters: 50}
"""


def test_audiocraft_checkpoint_matches_audiocraft_modules(audio, tmp_path):
    seanet, vq = _audiocraft()
    cfg = yaml.safe_load(XP_CFG)
    kwargs = {k: v for k, v in cfg["seanet"].items() if k not in ("encoder", "decoder")}
    kwargs.update(channels=1, causal=False)
    torch.manual_seed(5)
    encoder = seanet.SEANetEncoder(**kwargs).eval()
    quantizer = vq.ResidualVectorQuantizer(dimension=16, n_q=4, bins=2048).eval()
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            param.copy_(
                0.5 + torch.rand_like(param)
                if name.endswith("weight_g")
                else 0.3 * torch.randn_like(param)
            )
        x = torch.from_numpy(audio)[:, None]
        emb = encoder(x)
        mean, std = emb.mean((0, 2)), emb.std((0, 2))
        for k, layer in enumerate(quantizer.vq.layers):
            book = layer._codebook.embed
            book.copy_(torch.randn_like(book) * std * 2.0 * 0.5**k + (mean if k == 0 else 0))
        want_codes = quantizer.encode(emb).numpy()
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"quantizer.{k}": v for k, v in quantizer.state_dict().items()})
    state["decoder.model.0.conv.conv.bias"] = torch.zeros(3)  # decoder keys are ignored
    assert (
        any(k.endswith(".weight_v") for k in state)
        and "quantizer.vq.layers.3._codebook.embed" in state
    )
    path = tmp_path / "compression_state_dict.bin"
    torch.save({"best_state": state, "xp.cfg": XP_CFG, "version": "1.3.0", "exported": True}, path)

    model = convert_encodec(path)  # format detected, sizes from xp.cfg
    assert model.cfg.num_codebooks == 4 and model.cfg.hidden_size == 16
    got_emb, got_codes = flax_outputs(model, audio)
    assert len(np.unique(want_codes[:, 0])) > 5
    assert np.abs(got_emb - emb.numpy().transpose(0, 2, 1)).max() <= TOL
    np.testing.assert_array_equal(got_codes, want_codes)
    # the bare state dict (no xp.cfg): sizes read off the shapes give the same model
    bare = convert_encodec({k: v.numpy() for k, v in state.items()}, fmt="audiocraft")
    assert bare.cfg == model.cfg


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one line that names the key or file


def test_wrong_shape_names_the_key(hf):
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    key = "encoder.layers.13.lstm.weight_hh_l1"
    state[key] = state[key][:, :-1]
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for 'encoder\.layers\.13\.lstm\.weight_hh_l1'"
    ) as err:
        convert_encodec(state)
    assert "\n" not in str(err.value)


def test_unexpected_key_is_named(hf):
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    state["encoder.extra_scale"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.extra_scale"):
        convert_encodec(state)


def test_missing_key_is_named(hf):
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    del state["quantizer.layers.2.codebook.embed"]
    with pytest.raises(CheckpointError, match="quantizer.layers.2.codebook.embed"):
        convert_encodec(state, config=convert_encodec(hf.state_dict()).cfg)


def test_cli_missing_path_is_one_line(tmp_path, capsys):
    from bossa_jax.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(tmp_path / "nope"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint not found") and str(tmp_path / "nope") in err
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_load_encodec_rejects_a_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a bossa-jax checkpoint"):
        load_encodec(tmp_path)
