"""Q-Former parity (SPEC 2.2, 3.1-3.5): HF ``Blip2QFormerModel`` for the query/audio stream, the
plain-torch re-creation of the official ``BertLMHeadModel`` (tests/reference/qformer_torch.py) for
the octuple embedding, the note stream, the three mask types and the LM head. fp32, max |diff|
<= 1e-4, weights loaded through the official-name table of convert/musicbert.py."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bossa_jax.config import MeshConfig, QFormerConfig
from bossa_jax.models.qformer import QFormer
from convert.common import fill, param_paths
from convert.musicbert import official_qformer_rules, values_from_official
from tests.reference.qformer_torch import BertLMHeadModel, RefConfig

CFG = QFormerConfig(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    encoder_width=16,
    num_query_tokens=4,
    max_position_embeddings=64,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
B, N, S = 3, 6, 7  # batch, notes, audio steps
TOL = 1e-4


def ref_config(cfg: QFormerConfig) -> RefConfig:
    return RefConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        layer_norm_eps=cfg.layer_norm_eps,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=cfg.pad_token_id,
        encoder_width=cfg.encoder_width,
        cross_attention_freq=cfg.cross_attention_freq,
        query_length=cfg.num_query_tokens,
    )


@pytest.fixture(scope="module")
def models():
    """(torch reference, its query tokens, the JAX Q-Former holding the same weights)."""
    torch.manual_seed(0)
    ref = BertLMHeadModel(ref_config(CFG))
    ref.resize_token_embeddings_mean(CFG.vocab_size + 1)
    with torch.no_grad():  # move every weight off its init (LN 1/0, zero biases hide swaps)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval()
    query_tokens = 0.02 * torch.randn(1, CFG.num_query_tokens, CFG.hidden_size)
    official = {k: v.numpy() for k, v in ref.state_dict().items()}
    official["query_tokens"] = query_tokens.numpy()
    model = QFormer(CFG, rngs=nnx.Rngs(1))
    values = values_from_official(
        model, official.__getitem__, official_qformer_rules(CFG), source="reference"
    )
    fill(model, values, source="reference")
    return ref, query_tokens, model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, size=(B, 8 * N))
    ids[:, 16:24] = CFG.dec_token_id  # note 2 = the [DEC] octuple (ITG input, SPEC 3.4)
    ids[1, -16:] = CFG.pad_token_id  # sample 1: two pad notes
    pad_mask = np.ones((B, N), np.float32)
    pad_mask[1, -2:] = 0
    key_mask = pad_mask.copy()
    key_mask[:, :2] = 0  # lead-sheet prefix masked as keys (SPEC 3.1)
    features = rng.normal(size=(B, S, CFG.encoder_width)).astype(np.float32)
    feature_mask = np.ones((B, S), np.float32)
    feature_mask[0, -3:] = 0
    return dict(
        ids=ids, pad_mask=pad_mask, key_mask=key_mask, features=features, feature_mask=feature_mask
    )


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "deterministic"))
def _call(graphdef, state, method, args, deterministic, dropout_rng):
    module = nnx.merge(graphdef, state)
    return getattr(module, method)(*args, deterministic=deterministic, dropout_rng=dropout_rng)


def run(model: QFormer, method: str, *args, deterministic: bool = True, dropout_rng=None):
    """Calls ``model.<method>`` functionally under one cached jax.jit (split, merge inside)."""
    graphdef, state = nnx.split(model)
    args = tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
    return _call(graphdef, state, method, args, deterministic, dropout_rng)


def assert_close(ours, theirs, tol: float = TOL):
    ours = np.asarray(ours)
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = float(np.max(np.abs(ours - theirs)))
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol}"


def test_audio_pass_matches_hf_blip2_qformer(models, inputs):
    """Queries + cross-attention to audio: HF's BLIP-2 Q-Former has the same structure (shared
    self-attention, query FFN, cross-attention every 2nd layer for query positions)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    ref, query_tokens, model = models
    hf_cfg = Blip2QFormerConfig(
        hidden_size=CFG.hidden_size,
        num_hidden_layers=CFG.num_hidden_layers,
        num_attention_heads=CFG.num_attention_heads,
        intermediate_size=CFG.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=CFG.layer_norm_eps,
        cross_attention_frequency=CFG.cross_attention_freq,
        encoder_hidden_size=CFG.encoder_width,
    )
    hf_cfg._attn_implementation = "eager"
    hf = Blip2QFormerModel(hf_cfg).eval()
    state = {}
    for key, value in ref.state_dict().items():
        if key.startswith("bert.encoder."):
            name = key[len("bert.") :].replace("attention.self.", "attention.attention.")
            if ".intermediate." in name or ".output.dense" in name and "attention" not in name:
                continue  # the text FFN: HF's Q-Former has none without text input
            if ".output.LayerNorm" in name and "attention" not in name:
                continue
            state[name] = value
        elif key.startswith("bert.embeddings.LayerNorm."):
            state["layernorm." + key.rsplit(".", 1)[1]] = value
    result = hf.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result

    feats, fmask = inputs["features"], inputs["feature_mask"]
    with torch.no_grad():
        expected = hf(
            query_embeds=query_tokens.expand(B, -1, -1),
            encoder_hidden_states=t(feats),
            encoder_attention_mask=t(fmask).long(),
        ).last_hidden_state
    query_out, _ = run(model, "audio_pass", feats, fmask)
    assert_close(query_out, expected)


def test_audio_pass_and_cached_keys_match_reference(models, inputs):
    ref, query_tokens, model = models
    feats, fmask = inputs["features"].copy(), inputs["feature_mask"].copy()
    fmask[2] = 0  # a clip with every audio step masked: finfo.min -> uniform average (SPEC 2.2)
    with torch.no_grad():
        expected, presents = ref.bert(
            query_embeds=query_tokens.expand(B, -1, -1),
            encoder_hidden_states=t(feats),
            encoder_attention_mask=t(fmask),
        )
    query_out, past_kv = run(model, "audio_pass", feats, fmask)
    assert_close(query_out, expected)
    assert len(past_kv) == CFG.num_hidden_layers
    for (k, v), (rk, rv) in zip(past_kv, presents):
        assert_close(k, rk.permute(0, 2, 1, 3))  # (B, H, Q, D) -> (B, Q, H, D)
        assert_close(v, rv.permute(0, 2, 1, 3))


def test_symbolic_pass_matches_reference(models, inputs):
    """Notes only: octuple embedding, note positions, -10000 key mask, text FFN."""
    ref, _, model = models
    key_mask = inputs["key_mask"].copy()
    key_mask[0] = 0  # every key masked: -10000 on all keys = unmasked softmax, as PyTorch
    with torch.no_grad():
        expected, _ = ref.bert(input_ids=t(inputs["ids"]), attention_mask=t(key_mask))
    hidden = run(model, "symbolic_pass", inputs["ids"], key_mask)
    assert_close(hidden, expected)


def test_multimodal_pass_matches_reference(models, inputs):
    ref, query_tokens, model = models
    mask = np.concatenate([np.ones((B, CFG.num_query_tokens), np.float32), inputs["key_mask"]], 1)
    with torch.no_grad():
        expected, _ = ref.bert(
            input_ids=t(inputs["ids"]),
            attention_mask=t(mask),
            query_embeds=query_tokens.expand(B, -1, -1),
            encoder_hidden_states=t(inputs["features"]),
            encoder_attention_mask=t(inputs["feature_mask"]),
        )
    hidden = run(
        model,
        "multimodal_pass",
        inputs["ids"],
        inputs["key_mask"],
        inputs["features"],
        inputs["feature_mask"],
    )
    assert hidden.shape == (B, CFG.num_query_tokens + N, CFG.hidden_size)
    assert_close(hidden, expected)


def test_decoder_logits_match_reference(models, inputs):
    """ITG (SPEC 3.4): cached query K/V from the audio pass, causal notes, pads masked, LM head."""
    ref, query_tokens, model = models
    feats, fmask, pad_mask = inputs["features"], inputs["feature_mask"], inputs["pad_mask"]
    with torch.no_grad():
        _, presents = ref.bert(
            query_embeds=query_tokens.expand(B, -1, -1),
            encoder_hidden_states=t(feats),
            encoder_attention_mask=t(fmask),
        )
        mask = torch.cat([torch.ones(B, CFG.num_query_tokens), t(pad_mask)], dim=1)
        expected, _, _ = ref(
            input_ids=t(inputs["ids"]), attention_mask=mask, past_key_values=presents
        )
    _, past_kv = run(model, "audio_pass", feats, fmask)
    logits = run(model, "decoder_logits", inputs["ids"], pad_mask, past_kv)
    assert logits.shape == (B, 8 * N, CFG.vocab_size)
    assert_close(logits, expected)
    # causal: a later note's ids cannot change an earlier note's logits
    ids = inputs["ids"].copy()
    ids[:, -8:] = 5
    changed = run(model, "decoder_logits", ids, pad_mask, past_kv)
    np.testing.assert_allclose(np.asarray(changed)[:, :-8], np.asarray(logits)[:, :-8], atol=1e-5)
    assert np.max(np.abs(np.asarray(changed)[0, -8:] - np.asarray(logits)[0, -8:])) > 1e-3


def test_dropout_flag(inputs):
    small = dataclasses.replace(CFG, num_hidden_layers=2)  # dropout logic, not depth: keep it fast
    model = QFormer(small, rngs=nnx.Rngs(0))
    ids, mask = inputs["ids"], inputs["key_mask"]
    feats, fmask = inputs["features"], inputs["feature_mask"]
    with pytest.raises(ValueError, match="dropout_rng"):
        run(model, "symbolic_pass", ids, mask, deterministic=False)
    train = QFormer(
        dataclasses.replace(small, hidden_dropout=0.1, attention_dropout=0.1), rngs=nnx.Rngs(1)
    )
    nnx.update(train, nnx.state(model, nnx.Param))
    plain = run(train, "symbolic_pass", ids, mask)
    np.testing.assert_allclose(plain, run(model, "symbolic_pass", ids, mask), atol=1e-6)
    a, b, c = (
        run(
            train,
            "symbolic_pass",
            ids,
            mask,
            deterministic=False,
            dropout_rng=jax.random.key(k, impl="rbg"),
        )
        for k in (1, 1, 2)
    )
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3 and float(jnp.max(jnp.abs(a - plain))) > 1e-3
    # the explicit attention-dropout path equals the fused one when (almost) nothing is dropped
    tiny = QFormer(dataclasses.replace(small, attention_dropout=1e-9), rngs=nnx.Rngs(2))
    nnx.update(tiny, nnx.state(model, nnx.Param))
    key = jax.random.key(0, impl="rbg")  # rbg: cheaper to compile on CPU than threefry
    explicit = run(
        tiny, "multimodal_pass", ids, mask, feats, fmask, deterministic=False, dropout_rng=key
    )
    np.testing.assert_allclose(
        explicit, run(model, "multimodal_pass", ids, mask, feats, fmask), atol=1e-5
    )


def test_pad_row_gets_no_gradient(inputs):
    """torch's padding_idx: the pad row is looked up but never updated by gradients."""
    model = QFormer(dataclasses.replace(CFG, num_hidden_layers=1), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(inputs["ids"])

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest).symbolic_pass(ids) ** 2)

    grads = jax.jit(jax.grad(loss))(params)["word_embeddings"]["embedding"][...]
    assert float(jnp.abs(grads[CFG.pad_token_id]).max()) == 0.0
    assert float(jnp.abs(grads[CFG.dec_token_id]).max()) > 0.0


def test_paper_parameter_count():
    """SPEC 2.3: BertLMHeadModel 185,954,773 parameters + 32 x 768 query tokens."""
    model = nnx.eval_shape(lambda: QFormer(QFormerConfig(), rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == 185_954_773 + 32 * 768


def test_parameters_carry_logical_axes(models):
    _, _, model = models
    known = {name for name, _ in MeshConfig().rules} | {None}
    for path, var in param_paths(model).items():
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim, path
        assert set(names) <= known, (path, names)


def test_sharded_audio_pass_matches_single_device(inputs):
    """Created sharded on a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices: parameters follow
    their logical axes (odd vocabulary dims stay whole) and the output equals the unsharded one."""
    from jax.sharding import PartitionSpec as P

    from bossa_jax.sharding import create_sharded, make_mesh, rules_of, use_mesh

    small = dataclasses.replace(CFG, num_hidden_layers=2)
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    feats = jnp.asarray(np.concatenate([inputs["features"], inputs["features"][:1]]))
    expected, _ = run(QFormer(small, rngs=nnx.Rngs(0)), "audio_pass", feats)
    mesh_cfg = MeshConfig(shape={"data": 2, "fsdp": 2, "tensor": 2})
    with use_mesh(make_mesh(mesh_cfg), rules_of(mesh_cfg)):
        model = create_sharded(lambda: QFormer(small, rngs=nnx.Rngs(0)))
        assert model.layers["0"].self_attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
        assert model.lm_head.decoder.kernel[...].sharding.spec == P("fsdp", None)
        query_out, _ = run(model, "audio_pass", feats)
    assert query_out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(query_out, expected, atol=1e-5)
