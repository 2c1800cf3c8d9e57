"""convert/bossa.py: an official stage-1 state dict (SPEC 7 layout) built from the torch references
(HF ``MusicgenModel`` as ``musicgen_decoder``, the plain-torch ``Blip2Qformer`` of
tests/reference/losses_torch.py) -> Stage1Model, checked end to end (codes -> losses) against
torch, plus LAVIS aliases, key reports and the CLI round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import MusicgenDecoderConfig, MusicgenModel

from bossa_jax.cli import UsageError
from bossa_jax.config import load_config
from bossa_jax.errors import BossaError, CheckpointError
from bossa_jax.models.bossa import load_stage1
from convert.bossa import LAVIS_ALIASES, convert_stage1, main
from convert.common import param_paths
from tests.models.test_bossa import NEG_AUDIO, NEG_SYMBO, note_batch, ref_config
from tests.reference.losses_torch import Stage1Torch

OVERRIDES = ["qformer.num_hidden_layers=2"]
CFG = load_config("tiny", OVERRIDES)
B, FRAMES = 4, 5
SPECIAL = 2048


@pytest.fixture(scope="module")
def official():
    """(official stage-1 state dict as numpy, torch MusicGen, torch Blip2Qformer)."""
    torch.manual_seed(0)
    mg = CFG.musicgen
    hf = MusicgenModel(
        MusicgenDecoderConfig(
            vocab_size=mg.vocab_size,
            hidden_size=mg.hidden_size,
            num_attention_heads=mg.num_attention_heads,
            ffn_dim=mg.ffn_dim,
            num_hidden_layers=mg.keep_layers,  # the file holds only the kept blocks (SPEC 1.3)
            num_codebooks=mg.num_codebooks,
            dropout=0.0,
        )
    ).eval()
    ref = Stage1Torch(ref_config())
    with torch.no_grad():
        for module in (hf, ref):
            for name, p in module.named_parameters():
                if name != "temp":
                    p.add_(0.2 * torch.randn_like(p))
    ref.eval()
    state = {f"musicgen_decoder.{k}": v for k, v in hf.state_dict().items()}
    state["musicgen_enc_to_dec_proj.weight"] = torch.randn(mg.hidden_size, 24)
    state["musicgen_enc_to_dec_proj.bias"] = torch.randn(mg.hidden_size)
    state.update(ref.state_dict())
    return {k: v.detach().numpy().copy() for k, v in state.items()}, hf, ref


def delay_pattern(codes: np.ndarray) -> np.ndarray:
    """SPEC 1.2 written out: step 0 special; step s >= 1 of codebook q = codes[q, s-1-q]."""
    batch, k, frames = codes.shape
    out = np.full((batch, k, frames + k), SPECIAL, codes.dtype)
    for q in range(k):
        for s in range(1, frames + k):
            if 0 <= s - 1 - q < frames:
                out[:, q, s] = codes[:, q, s - 1 - q]
    return out


def test_converted_model_matches_torch_from_codes(official):
    tensors, hf, ref = official
    model = convert_stage1(tensors, CFG)
    rng = np.random.default_rng(0)
    notes, ls_mask, pad_mask = note_batch(rng)
    codes = rng.integers(0, SPECIAL, (B, 4, FRAMES))
    steps = FRAMES + 4
    audio_mask = np.ones((B, steps), np.int64)
    audio_mask[2, -3:] = 0
    pattern = delay_pattern(codes)
    with torch.no_grad():
        features = hf(input_ids=torch.from_numpy(pattern.reshape(B * 4, steps))).last_hidden_state
        want = ref(
            features,
            torch.from_numpy(audio_mask).float(),
            torch.from_numpy(notes),
            torch.from_numpy(ls_mask),
            torch.from_numpy(pad_mask),
            torch.from_numpy(NEG_SYMBO),
            torch.from_numpy(NEG_AUDIO),
        )
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        return nnx.merge(graphdef, state).losses(
            notes,
            ls_mask,
            pad_mask,
            audio_mask,
            codes=jnp.asarray(codes),
            negatives=(jnp.asarray(NEG_SYMBO), jnp.asarray(NEG_AUDIO)),
            field_mean="official",
        )[1]

    got = run(state)
    for name in ("itc", "itm", "itg", "loss"):
        diff = abs(float(got[name]) - want[name].item())
        assert diff <= 1e-4, f"{name}: |diff| {diff:.3g}"
    assert float(model.temp[...]) == pytest.approx(ref.temp.item())


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in param_paths(model).items()}


def test_lavis_aliases_and_no_musicgen(official):
    tensors, _, _ = official
    lavis = {}
    for key, value in tensors.items():
        for new, old in ((n, o) for o, n in LAVIS_ALIASES):
            if key.startswith(new):
                key = old + key[len(new) :]
        lavis[key] = value
    assert "ln_audio.weight" in lavis and "itm_head.bias" in lavis and "text_proj.weight" in lavis
    plain = _params(convert_stage1(tensors, CFG, with_musicgen=False))
    aliased = _params(convert_stage1(lavis, CFG, with_musicgen=False))
    assert plain.keys() == aliased.keys() and not any(k.startswith("musicgen") for k in plain)
    for key in plain:
        np.testing.assert_array_equal(plain[key], aliased[key])


def test_key_reports_name_the_keys(official):
    tensors, _, _ = official
    with pytest.raises(CheckpointError, match=r"unexpected keys \['Qformer.extra.weight'\]"):
        convert_stage1({**tensors, "Qformer.extra.weight": np.zeros(3)}, CFG)
    missing = {
        k: v
        for k, v in tensors.items()
        if k not in ("symbo_proj.bias", "musicgen_decoder.decoder.layers.1.fc2.weight")
    }
    with pytest.raises(CheckpointError, match="missing keys") as err:
        convert_stage1(missing, CFG)
    assert "'symbo_proj.bias'" in str(err.value)
    assert "'musicgen_decoder.decoder.layers.1.fc2.weight'" in str(err.value)
    bad = dict(tensors, **{"audio_proj.weight": tensors["audio_proj.weight"].T})
    with pytest.raises(CheckpointError, match="shape mismatch for 'audio_proj.weight'"):
        convert_stage1(bad, CFG)
    both = dict(tensors, **{"ln_audio.weight": tensors["layer_norm.weight"]})
    with pytest.raises(CheckpointError, match="ln_audio.weight"):
        convert_stage1(both, CFG)
    untied = dict(tensors)
    untied["Qformer.cls.predictions.bias"] = tensors["Qformer.cls.predictions.bias"] + 1
    with pytest.raises(CheckpointError, match="Qformer.cls.predictions.bias"):
        convert_stage1(untied, CFG)


def test_cli_round_trip(official, tmp_path, capsys):
    tensors, _, _ = official
    source = tmp_path / "bossa_stage1.pt"
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, source)
    out = tmp_path / "stage1"
    assert main([str(source), str(out), "--stage", "1", "--config", "tiny", *OVERRIDES]) == 0
    assert "wrote" in capsys.readouterr().out
    restored = _params(load_stage1(out))
    direct = _params(convert_stage1(tensors, CFG))
    assert restored.keys() == direct.keys()
    for key in direct:
        np.testing.assert_array_equal(restored[key], direct[key])
    with pytest.raises(UsageError, match="--stage: invalid choice: 3"):  # one line, exit 2
        main([str(source), str(out / "x"), "--stage", "3"])
    # a stage-1 file is not a stage-2 one: the missing stage-2 keys are named, nothing written
    with pytest.raises(CheckpointError, match=r"missing keys \['blip2qformer\."):
        main([str(source), str(out / "x"), "--stage", "2", "--config", "tiny", *OVERRIDES])
    assert not (out / "x").exists()


def test_projection_width_comes_from_the_checkpoint(official):
    """A stage-1 file whose ITC projections are 64 wide (not the paper's 256) converts to 64."""
    tensors, _, _ = official
    rng = np.random.default_rng(3)
    width = 64
    narrow = dict(tensors)
    for head in ("audio_proj", "symbo_proj"):
        d = tensors[f"{head}.weight"].shape[1]
        narrow[f"{head}.weight"] = rng.standard_normal((width, d)).astype(np.float32)
        narrow[f"{head}.bias"] = rng.standard_normal(width).astype(np.float32)
    model = convert_stage1(narrow, CFG, with_musicgen=False)
    assert model.audio_proj.out_features == width and model.symbo_proj.out_features == width
    params = _params(model)
    np.testing.assert_array_equal(params["audio_proj.kernel"], narrow["audio_proj.weight"].T)
    np.testing.assert_array_equal(params["symbo_proj.bias"], narrow["symbo_proj.bias"])
    mixed = dict(narrow, **{k: tensors[k] for k in ("symbo_proj.weight", "symbo_proj.bias")})
    with pytest.raises(CheckpointError, match="shape mismatch for 'symbo_proj.weight'"):
        convert_stage1(mixed, CFG, with_musicgen=False)


def test_stage2_official_export_round_trip(tmp_path, capsys):
    """Official stage-2 state dict -> bossa-jax (``--stage 2``) -> the official layout again
    (``--export-official``): every key comes back, every value equal (``_float_tensor`` is
    fairseq's uninitialised dtype buffer: its shape only)."""
    from tests.models.test_arranger import MUSECOCO_KWARGS, Stage2Torch, ref_config, state_dict

    torch.manual_seed(1)
    ref = Stage2Torch(ref_config(), MUSECOCO_KWARGS)
    with torch.no_grad():  # every weight off its trivial init (LoRA B = 0, LN 1/0, zero biases)
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    official = state_dict(ref)
    source = tmp_path / "bossa_stage2.pt"
    torch.save({k: torch.from_numpy(v) for k, v in official.items()}, source)
    ours = tmp_path / "stage2"
    args = ["--stage", "2", "--config", "tiny", *OVERRIDES, "--no-musicgen"]
    assert main([str(source), str(ours), *args]) == 0
    exported = tmp_path / "export" / "bossa_stage2.pt"
    assert main([str(ours), str(exported), "--stage", "2", "--export-official"]) == 0
    assert "official stage-2 layout" in capsys.readouterr().out
    back = {k: v.numpy() for k, v in torch.load(exported, weights_only=True).items()}
    assert back.keys() == official.keys()
    for key, value in official.items():
        if key.endswith("_float_tensor"):
            assert back[key].shape == value.shape
            continue
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # safetensors too, the same tensors
    from safetensors.numpy import load_file

    from convert.bossa import export_official

    again = export_official(ours, tmp_path / "export" / "bossa_stage2.safetensors")
    for key, value in load_file(str(again)).items():
        np.testing.assert_array_equal(value, back[key], err_msg=key)
    # refused in one line, nothing written: no file suffix, stage 1, an existing file
    with pytest.raises(UsageError, match="file name ending in .pt"):
        main([str(ours), str(tmp_path / "x"), "--stage", "2", "--export-official"])
    with pytest.raises(UsageError, match="give --stage 2"):
        main([str(ours), str(tmp_path / "x.pt"), "--stage", "1", "--export-official"])
    with pytest.raises(BossaError, match="exists; pass --overwrite"):
        main([str(ours), str(exported), "--stage", "2", "--export-official"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.pt").exists()


def test_stage2_export_keeps_musicgen(tmp_path):
    """A stage-2 model with the frozen MusicGen -> the official layout -> back: every parameter
    equal, MusicGen under ``blip2qformer.musicgen_decoder.decoder.`` with the names the
    converter reads."""
    from bossa_jax.models.arranger import Stage2Model, save_stage2
    from convert.bossa import convert_stage2, export_official

    model = Stage2Model(CFG.qformer, CFG.musecoco, CFG.musicgen, rngs=nnx.Rngs(4))
    for var in param_paths(model).values():  # every weight off its trivial init
        var[...] = var[...] + 0.1
    save_stage2(tmp_path / "ours", model)
    exported = export_official(tmp_path / "ours", tmp_path / "bossa_stage2.pt")
    state = torch.load(exported, weights_only=True)
    assert any(k.startswith("blip2qformer.musicgen_decoder.decoder.layers.") for k in state)
    back = _params(convert_stage2(exported, CFG, with_musicgen=True))
    want = _params(model)
    assert back.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
