"""Stage2Model (bossa_jax/models/arranger.py, SPEC 4.1-4.3) against the plain-torch official
``Blip2Musecoco.forward`` (tests/reference/arranger_torch.py on this project's torch Q-Former and
MuseCoco references): logits, labels and loss on tiny random weights copied through
convert/bossa.py's stage-2 name table; zero LoRA; the trainable sets at paper size; dropout."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bossa_jax.config import load_config
from bossa_jax.errors import CheckpointError
from bossa_jax.models.arranger import (
    POSITION_START,
    TRAINABLE_OFFICIAL,
    TRAINABLE_PAPER,
    Stage2Model,
    load_stage2,
    stage2_labels,
)
from bossa_jax.symbolic import remi
from bossa_jax.train.stage2 import stage2_loss
from convert.bossa import main as convert_main
from convert.bossa import stage2_values
from convert.common import fill, param_paths
from tests.models.test_bossa import ref_config
from tests.reference.arranger_torch import Stage2Torch

CFG = load_config("tiny", ["qformer.num_hidden_layers=2"])
Q, M = CFG.qformer, CFG.musecoco  # MuseCoco 64 wide, 3 heads of 21 (q/k/v 63 wide), LoRA r4
B, L, S = 2, 90, 9  # batch, tokens, audio steps
TOL = 1e-4
MUSECOCO_KWARGS = dict(
    vocab=M.vocab_size,
    d=M.hidden_size,
    heads=M.num_attention_heads,
    layers=M.num_hidden_layers,
    ffn=M.ffn_dim,
    rank=M.lora_rank,
)


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


@pytest.fixture(scope="module")
def reference() -> Stage2Torch:
    torch.manual_seed(0)
    ref = Stage2Torch(ref_config(), MUSECOCO_KWARGS)
    with torch.no_grad():  # every weight off its trivial init (LoRA B, LN 1/0, zero biases)
        for _, p in ref.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ref.eval()


def state_dict(ref: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def abstract_model(musecoco=M) -> Stage2Model:
    return nnx.eval_shape(lambda: Stage2Model(Q, musecoco, None, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def model(reference) -> Stage2Model:
    model = abstract_model()
    fill(model, stage2_values(state_dict(reference), model, source="ref"), source="ref")
    return model


@pytest.fixture(scope="module")
def batch():
    """Stage-2 layout: </s>, 60 attributes, <sep> at 61, lead sheet, <sep>, arrangement, </s>,
    pads; row 1 shorter (padded) with a longer prompt; audio with masked steps."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, M.vocab_size, (B, L))
    tokens[:, 0] = remi.EOS
    tokens[:, POSITION_START] = remi.SEP
    control = np.zeros((B, L), bool)
    pad = np.zeros((B, L), bool)
    for b, (second_sep, end) in enumerate([(66, L - 1), (70, 81)]):
        tokens[b, second_sep] = remi.SEP
        tokens[b, end] = remi.EOS
        tokens[b, end + 1 :] = remi.PAD
        control[b, : second_sep + 1] = True
        pad[b, end + 1 :] = True
    features = (rng.normal(size=(B, S, Q.encoder_width)) * 2 + 0.5).astype(np.float32)
    audio_mask = np.ones((B, S), np.int64)
    audio_mask[1, -4:] = 0
    return dict(
        tokens=tokens, control_mask=control, pad_mask=pad, features=features, audio_mask=audio_mask
    )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(graphdef, state, args, rng, options):
    return nnx.merge(graphdef, state)(*args[:3], features=args[3], dropout_rng=rng, **dict(options))


def forward(model: Stage2Model, batch, rng=None, **options) -> jax.Array:
    """``model(...)`` through ``jax.jit`` (split outside, merge inside); options are static."""
    graphdef, state = nnx.split(model)
    args = tuple(jnp.asarray(batch[k]) for k in ("tokens", "pad_mask", "audio_mask", "features"))
    return _forward(graphdef, state, args, rng, tuple(sorted(options.items())))


def test_position_start_is_the_first_sep():
    """</s> + 60 attributes + <sep>: the first <sep> is token index 61 (SPEC 4.3)."""
    assert len(remi.PROMPT_PREFIX_IDS) == POSITION_START + 1
    assert remi.PROMPT_PREFIX_IDS[POSITION_START] == remi.SEP
    assert remi.PROMPT_PREFIX_IDS[0] == remi.EOS


def test_logits_labels_and_loss_match_torch(reference, model, batch):
    with torch.no_grad():
        expected, labels, loss = reference(
            t(batch["features"]),
            t(batch["audio_mask"]),
            t(batch["tokens"]),
            t(batch["control_mask"]),
            t(batch["pad_mask"]),
        )
    got = forward(model, batch)
    assert got.shape == (B, Q.num_query_tokens + L, M.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=TOL, rtol=0)
    ours = stage2_labels(
        jnp.asarray(batch["tokens"]),
        batch["control_mask"],
        batch["pad_mask"],
        Q.num_query_tokens,
    )
    np.testing.assert_array_equal(np.asarray(ours), labels.numpy())
    # supervised: the arrangement tokens and the final </s> of each row
    assert int((ours != -100).sum()) == (L - 1 - 66) + (81 - 70)
    ours_loss, count = stage2_loss(got, ours)
    np.testing.assert_allclose(float(ours_loss), loss.item(), atol=TOL)
    assert int(count) == int((labels[:, 1:] != -100).sum())


def test_zero_lora_equals_the_model_without_lora(reference, batch):
    values = stage2_values(state_dict(reference), abstract_model(), source="ref")
    zero_b = {k: (np.zeros_like(v) if k.endswith(".lora.b") else v) for k, v in values.items()}
    with_lora = abstract_model()
    fill(with_lora, zero_b, source="ref")
    without = abstract_model(dataclasses.replace(M, lora=False))
    fill(without, {k: v for k, v in values.items() if ".lora." not in k}, source="ref")
    assert not nnx.state(without, nnx.LoRAParam)
    np.testing.assert_array_equal(
        np.asarray(forward(with_lora, batch)), np.asarray(forward(without, batch))
    )


def test_query_only_qformer_has_no_symbolic_parameters(model):
    names = set(param_paths(model.qformer))
    for deleted in (
        "word_embeddings",
        "position_embeddings",
        "downsampling",
        "lm_head",
        "text_mlp",
    ):
        assert not any(deleted in n for n in names), deleted
    assert any("query_mlp" in n for n in names) and any("cross_attn" in n for n in names)
    with pytest.raises(ValueError, match="symbolic branch"):
        model.qformer.embed_notes(jnp.zeros((1, 8), jnp.int32))


def test_stage2_converter_names_a_missing_key(reference):
    tensors = state_dict(reference)
    del tensors["blip2qformer.Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
    with pytest.raises(CheckpointError, match="crossattention.self.key.weight"):
        stage2_values(tensors, abstract_model(), source="ref")
    tensors = state_dict(reference)
    tensors["blip2qformer.Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros(2)
    with pytest.raises(CheckpointError, match="unexpected keys.*intermediate.dense"):
        stage2_values(tensors, abstract_model(), source="ref")


def test_dropout_only_where_asked(model, batch):
    key = jax.random.key(3)
    plain = np.asarray(forward(model, batch))
    np.testing.assert_array_equal(np.asarray(forward(model, batch, key)), plain)
    musecoco_on = np.asarray(forward(model, batch, key, musecoco_dropout=True))
    qformer_on = np.asarray(forward(model, batch, key, qformer_dropout=True))
    assert not np.allclose(musecoco_on, plain) and not np.allclose(qformer_on, plain)
    with pytest.raises(ValueError, match="dropout_rng"):
        forward(model, batch, qformer_dropout=True)


def test_trainable_sets_at_paper_size():
    """SPEC 4.2: Q-Former remainder 111,064,576 + LoRA 4,709,376 + projection 1,574,912 =
    117,348,864 trainable (abstract model: nothing allocated)."""
    cfg = load_config("paper")
    model = nnx.eval_shape(lambda: Stage2Model(cfg.qformer, cfg.musecoco, rngs=nnx.Rngs(0)))

    def count(filt) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, filt)))

    assert count(TRAINABLE_OFFICIAL) == 117_348_864
    assert count(nnx.LoRAParam) == 4_709_376
    projection = nnx.All(nnx.Param, nnx.PathContains("musecoco_proj"))
    assert count(projection) == 1_574_912
    assert count(TRAINABLE_PAPER) == 4_709_376 + 1_574_912
    frozen_base = nnx.All(nnx.Param, nnx.PathContains("musecoco"), nnx.Not(nnx.LoRAParam))
    assert count(frozen_base) == 1_212_161_472  # SPEC 4.5, none of it trainable
    assert count(nnx.All(frozen_base, TRAINABLE_OFFICIAL)) == 0


def test_official_stage2_file_converts_and_round_trips(reference, batch, tmp_path):
    """A ``bossa_stage2.pt``-layout file (the torch reference's state dict, LAVIS ``ln_audio``
    name included) -> ``python -m convert.bossa --stage 2`` -> ``load_stage2``: same logits."""
    tensors = {k: torch.from_numpy(v) for k, v in state_dict(reference).items()}
    for name in ("weight", "bias"):  # the notebook renames ln_audio -> layer_norm on load
        tensors[f"blip2qformer.ln_audio.{name}"] = tensors.pop(f"blip2qformer.layer_norm.{name}")
    torch.save(tensors, tmp_path / "bossa_stage2.pt")
    out = tmp_path / "converted"
    argv = [str(tmp_path / "bossa_stage2.pt"), str(out), "--stage", "2", "--config", "tiny"]
    assert convert_main([*argv, "--no-musicgen", "qformer.num_hidden_layers=2"]) == 0
    model = load_stage2(out)
    assert model.musicgen is None and model.musecoco.cfg.lora_rank == M.lora_rank
    with torch.no_grad():
        expected, _, _ = reference(
            t(batch["features"]),
            t(batch["audio_mask"]),
            t(batch["tokens"]),
            t(batch["control_mask"]),
            t(batch["pad_mask"]),
        )
    np.testing.assert_allclose(
        np.asarray(forward(model, batch)), expected.numpy(), atol=TOL, rtol=0
    )
