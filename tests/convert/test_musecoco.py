"""convert/musecoco.py: the HF-port layout (safetensors, .pt, state dict, stage-2 prefix) ->
MuseCoco, round trip, the official key list, and bad checkpoints named in one line."""

from __future__ import annotations

import argparse
import collections
import fractions
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bossa_jax.config import MuseCocoConfig
from bossa_jax.errors import CheckpointError, run_cli
from convert.musecoco import IGNORED, convert_musecoco, load_musecoco, main, source_keys
from convert.musecoco import to_hf_state_dict as export
from tests.models.test_musecoco import CFG, forward, inputs, reference, state_dict
from tests.shared_reference import shared_file

HEADS = ["--num-heads", str(CFG.num_attention_heads)]


@pytest.fixture(scope="module")
def ref():
    return reference(seed=1)


@pytest.fixture(scope="module")
def weights(ref):
    return state_dict(ref)


def _logits(ref, tokens, pad):
    with torch.no_grad():
        return ref(torch.tensor(tokens), torch.tensor(pad)).numpy()


def test_key_names_are_the_official_list():
    path = shared_file("reference/musecoco-1b/state_dict_keys.json")
    official = json.loads(path.read_text())
    ours = source_keys(MuseCocoConfig(lora=False)) + list(IGNORED)
    assert sorted(ours) == sorted(official) and len(official) == 389


def test_round_trip_through_files_keeps_dtype_and_numbers(tmp_path, ref, weights):
    tokens, pad, _, _ = inputs(seed=7)
    expected = _logits(ref, tokens, pad)
    tensors = {k: torch.from_numpy(v).contiguous() for k, v in weights.items()}
    save_file(tensors, tmp_path / "model.safetensors")
    torch.save(tensors, tmp_path / "model.pt")
    for src in ("model.safetensors", "model.pt"):
        model = convert_musecoco(tmp_path / src, num_heads=CFG.num_attention_heads)
        got = forward(model, jnp.asarray(tokens), jnp.asarray(pad))
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    back = export(model)
    assert set(back) == set(weights) - set(IGNORED)
    for key, value in back.items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)
    # bf16 sources stay bf16 (LoRA is always fp32)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, tmp_path / "bf16.safetensors")
    bf16 = convert_musecoco(tmp_path / "bf16.safetensors", num_heads=CFG.num_attention_heads)
    assert bf16.cfg.dtype == "bfloat16" and bf16.lm_head.kernel.dtype == jnp.bfloat16
    assert bf16.layers.self_attn.k_proj.lora.b.dtype == jnp.float32


def test_hf_directory_config_and_stage2_prefix(tmp_path, ref, weights):
    (tmp_path / "hf").mkdir()
    config = {"n_embd": 64, "n_head": 3, "n_layer": 2, "vocab_size": CFG.vocab_size}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    base = {k: torch.from_numpy(v) for k, v in weights.items() if "lora" not in k}
    save_file(base, tmp_path / "hf" / "model.safetensors")
    model = convert_musecoco(tmp_path / "hf")  # heads from config.json
    assert model.cfg.num_attention_heads == 3 and not model.cfg.lora
    # a stage-2 file: MuseCoco (with LoRA) under "musecoco.", other modules beside it
    stage2 = {f"musecoco.{k}": torch.from_numpy(v) for k, v in weights.items()}
    stage2["musecoco_proj.weight"] = torch.zeros(64, 8)
    torch.save(stage2, tmp_path / "stage2.pt")
    model = convert_musecoco(tmp_path / "stage2.pt", num_heads=3, prefix="musecoco.")
    assert model.cfg.lora and model.cfg.lora_rank == CFG.lora_rank
    tokens, pad, _, _ = inputs(seed=8)
    got = forward(model, jnp.asarray(tokens), jnp.asarray(pad))
    np.testing.assert_allclose(np.asarray(got), _logits(ref, tokens, pad), atol=1e-4, rtol=0)


def test_command_writes_a_checkpoint_load_restores(tmp_path, weights):
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "src.pt")
    assert main([str(tmp_path / "src.pt"), str(tmp_path / "out"), *HEADS]) == 0
    restored = load_musecoco(tmp_path / "out")
    assert restored.cfg == MuseCocoConfig(**{**CFG.__dict__, "chunk_size": 128, "dtype": "float32"})
    for key, value in export(restored).items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)


def test_missing_unexpected_and_wrong_shapes_are_named(weights):
    broken = dict(weights)
    del broken["decoder.layers.1.fc2.bias"]
    broken["decoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as err:
        convert_musecoco(broken, num_heads=3)
    text = str(err.value)
    assert "\n" not in text
    assert "missing keys ['decoder.layers.1.fc2.bias']" in text
    assert "unexpected keys ['decoder.layers.0.extra.weight']" in text
    wrong = dict(weights, **{"decoder.layers.1.fc1.weight": np.zeros((128, 60), np.float32)})
    with pytest.raises(CheckpointError, match=r"'decoder.layers.1.fc1.weight'.*\(128, 64\)"):
        convert_musecoco(wrong, num_heads=3)
    with pytest.raises(CheckpointError, match="--num-heads"):
        convert_musecoco(weights)
    with pytest.raises(CheckpointError, match="q_proj.weight"):
        convert_musecoco(weights, num_heads=4)  # 4 x 16 = 64 rows, the file has 63


def test_command_errors_are_one_line_and_write_nothing(tmp_path, capsys, weights):
    broken = {k: torch.from_numpy(v) for k, v in weights.items() if "lm_head" not in k}
    torch.save(broken, tmp_path / "src.pt")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(tmp_path / "src.pt"), str(tmp_path / "out"), *HEADS])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lm_head.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _fairseq_checkpoint(weights, **arg_changes):
    """The original MuseCoco release layout (fairseq 0.10 ``save_state``): ``args`` (a Namespace
    of ``linear_transformer_lm_1billion``'s fields), ``model`` (decoder names, the head as
    ``decoder.output_projection``, the ``decoder.version`` buffer) and the training state beside
    them (optimizer history with a numpy best loss, extra state, Adam moments)."""
    model = collections.OrderedDict()
    for key, value in weights.items():
        if "lora" not in key:  # the release has no adapters
            model[FAIRSEQ_HEAD if key == "lm_head.weight" else key] = torch.from_numpy(value)
    model["decoder.version"] = torch.Tensor([3])
    args = dict(
        arch="linear_transformer_lm_1billion",
        task="language_modeling_control",
        decoder_embed_dim=CFG.hidden_size,
        decoder_ffn_embed_dim=CFG.ffn_dim,
        decoder_layers=CFG.num_hidden_layers,
        decoder_attention_heads=CFG.num_attention_heads,
        decoder_normalize_before=True,
        activation_fn="gelu",
        dropout=0.1,
        no_scale_embedding=False,
        decoder_learned_pos=False,
        share_decoder_input_output_embed=False,
        adaptive_softmax_cutoff=None,
        command_embed_dim=128,
    )
    args.update(arg_changes)
    return {
        "args": argparse.Namespace(**args),
        "model": model,
        "optimizer_history": [
            {
                "criterion_name": "CrossEntropyCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": np.float64(1.25)},
                "num_updates": 7,
            }
        ],
        "extra_state": {"epoch": 2, "val_loss": np.float64(1.5), "train_iterator": {"epoch": 2}},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.ones(5)}}, "param_groups": []},
    }


FAIRSEQ_HEAD = "decoder.output_projection.weight"


def test_original_fairseq_checkpoint(tmp_path, weights, capsys):
    """The fairseq checkpoint of the MuseCoco release converts to the same model as the HF port
    of the same weights; its args give the sizes; bad args and disallowed pickles are one line."""
    base = {k: v for k, v in weights.items() if "lora" not in k}
    want = export(convert_musecoco(base, num_heads=CFG.num_attention_heads))
    path = tmp_path / "checkpoint_best.pt"
    torch.save(_fairseq_checkpoint(weights), path)
    model = convert_musecoco(path)  # heads, sizes and dropout from args
    assert model.cfg.num_attention_heads == CFG.num_attention_heads and not model.cfg.lora
    assert model.cfg.max_positions == 8192 and model.cfg.dropout == 0.1
    got = export(model)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # the command too
    assert main([str(path), str(tmp_path / "out")]) == 0
    assert "3 heads of 21" in capsys.readouterr().out
    for key, value in export(load_musecoco(tmp_path / "out")).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    # args that select another network, contradict the weights or lack the head count
    for changes, says in (
        ({"activation_fn": "relu"}, "args.activation_fn = 'relu'"),
        ({"decoder_learned_pos": True}, "args.decoder_learned_pos = True"),
        ({"decoder_layers": 3}, "args.decoder_layers = 3 but the weights imply 2"),
        ({"decoder_attention_heads": None}, "args.decoder_attention_heads missing"),
    ):
        torch.save(_fairseq_checkpoint(weights, **changes), tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=re.escape(says)):
            convert_musecoco(tmp_path / "bad.pt")
    # anything but tensors and the allowlisted globals is never unpickled
    odd = _fairseq_checkpoint(weights)
    odd["extra_state"]["meters"] = fractions.Fraction(1, 3)
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle.*Fraction") as err:
        convert_musecoco(tmp_path / "odd.pt")
    assert "\n" not in str(err.value)
