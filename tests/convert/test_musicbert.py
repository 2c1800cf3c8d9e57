"""MusicBERT (fairseq) -> Q-Former converter (SPEC 2.3): the transformer body against HF
``RobertaModel`` fed the fairseq-mapped weights, the whole initialisation against the official
procedure re-created in torch (tests/reference/qformer_torch.py), and the error paths."""

from __future__ import annotations

import argparse
import fractions
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bossa_jax.checkpoint import load_module, read_config
from bossa_jax.config import QFormerConfig, build
from bossa_jax.errors import CheckpointError, run_cli
from bossa_jax.models.qformer import QFormer
from convert.common import param_paths
from convert.musicbert import convert_musicbert, main, official_qformer_rules
from tests.reference.qformer_torch import BertLMHeadModel, RefConfig

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, LAYERS, HEADS, FFN, VOCAB, POSITIONS = 32, 4, 4, 64, 1237, 66
BASE = QFormerConfig(
    encoder_width=16, num_query_tokens=4, hidden_dropout=0.0, attention_dropout=0.0
)
B, N = 2, 5


def fairseq_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random MusicBERT-shaped fairseq state dict (fairseq names, (out, in) weights)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=g)

    enc = "encoder.sentence_encoder"
    sd = {
        f"{enc}.embed_tokens.weight": rnd(VOCAB, HIDDEN, scale=0.5),
        f"{enc}.embed_positions.weight": rnd(POSITIONS, HIDDEN, scale=0.5),
        f"{enc}.emb_layer_norm.weight": 1 + rnd(HIDDEN),
        f"{enc}.emb_layer_norm.bias": rnd(HIDDEN),
        f"{enc}.downsampling.0.weight": rnd(HIDDEN, 8 * HIDDEN),
        f"{enc}.downsampling.0.bias": rnd(HIDDEN),
        f"{enc}.upsampling.0.weight": rnd(8 * HIDDEN, HIDDEN, scale=0.2),
        f"{enc}.upsampling.0.bias": rnd(8 * HIDDEN),
        "encoder.lm_head.dense.weight": rnd(HIDDEN, HIDDEN, scale=0.2),
        "encoder.lm_head.dense.bias": rnd(HIDDEN),
        "encoder.lm_head.layer_norm.weight": 1 + rnd(HIDDEN),
        "encoder.lm_head.layer_norm.bias": rnd(HIDDEN),
        "encoder.lm_head.bias": rnd(VOCAB),
        "encoder.sentence_encoder.version": torch.tensor([2.0]),  # fairseq bookkeeping
    }
    sd[f"{enc}.embed_tokens.weight"][1] = 0  # fairseq padding rows
    sd[f"{enc}.embed_positions.weight"][1] = 0
    sd["encoder.lm_head.weight"] = sd[f"{enc}.embed_tokens.weight"]  # tied in fairseq
    for i in range(LAYERS):
        p = f"{enc}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}.self_attn.{proj}.weight"] = rnd(HIDDEN, HIDDEN, scale=0.2)
            sd[f"{p}.self_attn.{proj}.bias"] = rnd(HIDDEN)
        sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"] = rnd(FFN, HIDDEN, scale=0.2), rnd(FFN)
        sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"] = rnd(HIDDEN, FFN, scale=0.2), rnd(HIDDEN)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            sd[f"{p}.{norm}.weight"], sd[f"{p}.{norm}.bias"] = 1 + rnd(HIDDEN), rnd(HIDDEN)
    return sd


def fairseq_args() -> argparse.Namespace:
    return argparse.Namespace(
        arch="musicbert_base",
        encoder_embed_dim=HIDDEN,
        encoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        encoder_ffn_embed_dim=FFN,
        activation_fn="gelu",
        max_positions=POSITIONS - 2,
    )


def save(path: Path, sd: dict, **extra) -> Path:
    torch.save({"model": sd, "args": fairseq_args(), **extra}, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    sd = fairseq_state_dict()
    path = save(tmp_path_factory.mktemp("musicbert") / "musicbert.pt", sd)
    model, cfg = convert_musicbert(path, BASE, seed=0)
    return sd, path, model, cfg


def note_ids(seed: int = 1) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(B, 8 * N))
    ids[1, -8:] = 1  # a pad note
    return ids


def test_body_matches_hf_roberta(converted):
    """The transformer body (MusicBERT = RoBERTa encoder) on identically built embeddings; RoBERTa
    gets explicit position ids 0..N-1, the rows BOSSA uses (SPEC 2.3 / 10.23)."""
    from transformers import RobertaConfig, RobertaModel
    from transformers.models.roberta.modeling_roberta import RobertaLMHead

    sd, _, model, cfg = converted
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 4, 4)
    assert (cfg.intermediate_size, cfg.max_position_embeddings) == (FFN, POSITIONS)
    rcfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=POSITIONS,
        type_vocab_size=1,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=1,
    )
    rcfg._attn_implementation = "eager"
    roberta = RobertaModel(rcfg, add_pooling_layer=False).eval()
    enc = "encoder.sentence_encoder."
    hf = {  # the usual fairseq -> HF RoBERTa mapping
        "embeddings.word_embeddings.weight": sd[enc + "embed_tokens.weight"],
        "embeddings.position_embeddings.weight": sd[enc + "embed_positions.weight"],
        "embeddings.token_type_embeddings.weight": torch.zeros(1, HIDDEN),
        "embeddings.LayerNorm.weight": sd[enc + "emb_layer_norm.weight"],
        "embeddings.LayerNorm.bias": sd[enc + "emb_layer_norm.bias"],
    }
    names = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "self_attn_layer_norm": "attention.output.LayerNorm",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
        "final_layer_norm": "output.LayerNorm",
    }
    for i in range(LAYERS):
        for theirs, ours in names.items():
            for leaf in ("weight", "bias"):
                hf[f"encoder.layer.{i}.{ours}.{leaf}"] = sd[f"{enc}layers.{i}.{theirs}.{leaf}"]
    roberta.load_state_dict(hf, strict=True)

    ids = note_ids()
    key_mask = np.ones((B, N), np.float32)
    key_mask[1, -1] = 0
    key_mask[:, 0] = 0
    words = torch.nn.functional.embedding(torch.from_numpy(ids), sd[enc + "embed_tokens.weight"])
    down = torch.nn.functional.linear(
        words.reshape(B, N, 8 * HIDDEN),
        sd[enc + "downsampling.0.weight"],
        sd[enc + "downsampling.0.bias"],
    )
    with torch.no_grad():
        expected = roberta(
            inputs_embeds=down,
            position_ids=torch.arange(N)[None].expand(B, N),
            attention_mask=torch.from_numpy(key_mask),
        ).last_hidden_state
    hidden = model.symbolic_pass(jnp.asarray(ids), jnp.asarray(key_mask))
    assert float(np.max(np.abs(np.asarray(hidden) - expected.numpy()))) <= 1e-4

    # LM head: MusicBERT's upsampling + RobertaLMHead (decoder = the tied table, own bias)
    head = RobertaLMHead(rcfg).eval()
    head.load_state_dict(
        {
            "dense.weight": sd["encoder.lm_head.dense.weight"],
            "dense.bias": sd["encoder.lm_head.dense.bias"],
            "layer_norm.weight": sd["encoder.lm_head.layer_norm.weight"],
            "layer_norm.bias": sd["encoder.lm_head.layer_norm.bias"],
            "decoder.weight": sd["encoder.lm_head.weight"],
            "decoder.bias": sd["encoder.lm_head.bias"],  # transformers 5: used by forward
            "bias": sd["encoder.lm_head.bias"],
        },
        strict=True,
    )
    with torch.no_grad():
        up = torch.nn.functional.linear(
            expected, sd[enc + "upsampling.0.weight"], sd[enc + "upsampling.0.bias"]
        )
        expected_logits = head(up.reshape(B, 8 * N, HIDDEN))
    logits = model.lm_head(hidden)
    assert float(np.max(np.abs(np.asarray(logits) - expected_logits.numpy()))) <= 1e-4


def test_init_matches_official_procedure(converted):
    """Every loaded parameter equals the official init_Qformer re-created in torch (substring
    renames, strict=False load, query FFN copied, mean [DEC] row); fresh ones are BERT-init."""
    sd, _, model, cfg = converted
    ref = BertLMHeadModel(
        RefConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=POSITIONS,
            encoder_width=cfg.encoder_width,
            query_length=cfg.num_query_tokens,
        )
    )
    ref.load_musicbert(sd)
    ref.resize_token_embeddings_mean(VOCAB + 1)
    official = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = {k: np.asarray(v[...]) for k, v in param_paths(model).items()}
    rules = official_qformer_rules(cfg, query_tokens=None)
    for path, (key, transform) in rules.items():
        if ".cross_attn" in path:
            continue
        np.testing.assert_allclose(params[path], transform(official[key]), atol=1e-7, err_msg=path)

    table = params["word_embeddings.embedding"]
    assert table.shape == (VOCAB + 1, HIDDEN)
    rows = sd["encoder.sentence_encoder.embed_tokens.weight"]
    np.testing.assert_allclose(table[VOCAB], rows.mean(0).numpy(), atol=1e-7)
    np.testing.assert_array_equal(table[:VOCAB], rows.numpy())
    for i in range(LAYERS):
        for leaf in ("fc1.kernel", "fc2.kernel", "fc1.bias"):
            np.testing.assert_array_equal(
                params[f"layers.{i}.query_mlp.{leaf}"], params[f"layers.{i}.text_mlp.{leaf}"]
            )
        np.testing.assert_array_equal(
            params[f"layers.{i}.query_norm.scale"], params[f"layers.{i}.text_norm.scale"]
        )
    cross = [p for p in params if ".cross_attn." in p]
    assert {p.split(".")[1] for p in cross} == {"0", "2"}  # cross_attention_freq 2
    for p in cross:
        if p.endswith("bias"):
            assert not params[p].any(), p
        else:
            assert 0.01 < params[p].std() < 0.03, p
    np.testing.assert_array_equal(params["layers.0.cross_attn_norm.scale"], 1.0)
    assert 0.01 < params["query_tokens"].std() < 0.03


def test_cli_writes_a_loadable_checkpoint(converted, tmp_path, capsys):
    _, path, model, cfg = converted
    out = tmp_path / "qformer"
    # MusicGen width follows: the Q-Former cross-attends to its features (config check)
    overrides = [
        "qformer.encoder_width=16",
        "qformer.num_query_tokens=4",
        "musicgen.hidden_size=16",
        "musicgen.num_attention_heads=4",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(path), str(out), *overrides])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    saved_cfg = build(QFormerConfig, read_config(out)["qformer"])
    assert saved_cfg.hidden_size == HIDDEN and saved_cfg.encoder_width == 16
    restored = load_module(out, lambda: QFormer(saved_cfg, rngs=nnx.Rngs(5)))
    ours = {k: np.asarray(v[...]) for k, v in param_paths(model).items()}
    for key, var in param_paths(restored).items():
        if ".cross_attn" not in key and key != "query_tokens":  # fresh: seed 0 vs 0 anyway
            np.testing.assert_array_equal(np.asarray(var[...]), ours[key], err_msg=key)


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong_shape", "shape mismatch for 'encoder.sentence_encoder.layers.2.fc1.weight'"),
        ("unexpected", "unexpected keys ['encoder.sentence_encoder.extra.weight']"),
        ("missing", "missing keys ['encoder.sentence_encoder.layers.3.fc2.bias']"),
        ("bare_state_dict", "not a fairseq checkpoint"),
        ("no_args", "without 'args'"),
        ("wrong_heads", "args.encoder_layers = 5 but the weights imply 4"),
    ],
)
def test_bad_checkpoints_give_one_line(tmp_path, capsys, case, message):
    sd = fairseq_state_dict()
    path = tmp_path / "bad.pt"
    if case == "wrong_shape":
        sd["encoder.sentence_encoder.layers.2.fc1.weight"] = torch.zeros(FFN + 1, HIDDEN)
    elif case == "unexpected":
        sd["encoder.sentence_encoder.extra.weight"] = torch.zeros(3)
    elif case == "missing":
        del sd["encoder.sentence_encoder.layers.3.fc2.bias"]
    if case == "bare_state_dict":
        torch.save(sd, path)
    elif case == "no_args":
        torch.save({"model": sd}, path)
    elif case == "wrong_heads":
        args = fairseq_args()
        args.encoder_layers = 5
        torch.save({"model": sd, "args": args}, path)
    else:
        save(path, sd)
    with pytest.raises(CheckpointError) as err:
        convert_musicbert(path, BASE)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_disallowed_pickle_exits_non_zero_through_the_cli(tmp_path):
    """A pickled object outside the allowlist is refused (never unpickled): one line, exit 2."""
    path = save(tmp_path / "evil.pt", fairseq_state_dict(), extra_state=fractions.Fraction(1, 3))
    result = subprocess.run(
        [sys.executable, "-m", "convert.musicbert", str(path), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fractions.Fraction" in lines[0] and "disallowed" in lines[0]
    assert not (tmp_path / "out").exists()
