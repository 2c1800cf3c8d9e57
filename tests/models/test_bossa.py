"""Stage1Model (bossa_jax/models/bossa.py) against the plain-torch official ``Blip2Qformer``
(tests/reference/losses_torch.py on tests/reference/qformer_torch.py): every stage-1 loss, the
per-field LM losses (official and corrected), the total and the gradients of the trainable set, on
the tiny config with random weights copied through convert/bossa.py's official-name table."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bossa_jax.config import load_config
from bossa_jax.models import losses
from bossa_jax.models.bossa import TRAINABLE, Stage1Model, stage1_loss_fn
from convert.bossa import stage1_values
from convert.common import fill
from tests.reference.losses_torch import Stage1Torch
from tests.reference.qformer_torch import RefConfig

# the tiny config with 2 Q-Former layers (one with cross-attention): compile time dominates here
CFG = load_config("tiny", ["qformer.num_hidden_layers=2"])
Q = CFG.qformer
B, N, S = 4, 7, 9  # batch, notes, audio steps
TOL = 1e-4


def ref_config() -> RefConfig:
    return RefConfig(
        hidden_size=Q.hidden_size,
        num_hidden_layers=Q.num_hidden_layers,
        num_attention_heads=Q.num_attention_heads,
        intermediate_size=Q.intermediate_size,
        layer_norm_eps=Q.layer_norm_eps,
        vocab_size=Q.vocab_size,
        max_position_embeddings=Q.max_position_embeddings,
        pad_token_id=Q.pad_token_id,
        encoder_width=Q.encoder_width,
        cross_attention_freq=Q.cross_attention_freq,
        query_length=Q.num_query_tokens,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def official_state_dict(ref: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def models():
    """(torch Stage1Torch, the JAX Stage1Model without MusicGen holding the same weights)."""
    torch.manual_seed(0)
    ref = Stage1Torch(ref_config())
    with torch.no_grad():  # move every weight off its init (LN 1/0 and zero biases hide swaps;
        # large enough that the ITM loss tells the two negative directions apart, see below)
        for name, p in ref.named_parameters():
            if name != "temp":
                p.add_(0.2 * torch.randn_like(p))
        ref.temp.fill_(0.09)
    ref.eval()
    model = Stage1Model(Q, None, rngs=nnx.Rngs(1))
    fill(
        model,
        stage1_values(official_state_dict(ref), CFG, with_musicgen=False, source="ref"),
        source="ref",
    )
    return ref, model


def note_batch(rng: np.random.Generator):
    """Stage-1 layout per sample: lead sheet (mask 0), SOS (8 x id 0), arrangement, EOS (8 x 2),
    pads (8 x 1, pad_mask 0); different lengths per sample."""
    notes = np.ones((B, N, 8), np.int64)
    ls_mask = np.ones((B, N), np.int64)
    pad_mask = np.zeros((B, N), np.int64)
    for b in range(B):
        n_ls = 1 + b % 3
        n_arr = 1 + (b * 2) % (N - n_ls - 2)
        notes[b, :n_ls] = rng.integers(4, 1236, (n_ls, 8))
        notes[b, n_ls] = 0
        notes[b, n_ls + 1 : n_ls + 1 + n_arr] = rng.integers(4, 1236, (n_arr, 8))
        notes[b, n_ls + 1 + n_arr] = 2
        ls_mask[b, :n_ls] = 0
        pad_mask[b, : n_ls + n_arr + 2] = 1
    return notes.reshape(B, 8 * N), ls_mask, pad_mask


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    notes, ls_mask, pad_mask = note_batch(rng)
    features = rng.normal(size=(B, S, Q.encoder_width)).astype(np.float32) * 2 + 0.5
    audio_mask = np.ones((B, S), np.int64)
    audio_mask[1, -4:] = 0
    audio_mask[3, 4:] = 0  # an (almost) empty clip: only the leading pattern steps stay valid
    return dict(
        notes=notes,
        leadsheet_mask=ls_mask,
        pad_mask=pad_mask,
        audio_mask=audio_mask,
        features=features,
    )


NEG_SYMBO = np.array([2, 0, 3, 1])  # symbolic paired with audio b (never b)
NEG_AUDIO = np.array([1, 3, 0, 2])  # audio paired with symbolic b


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


def torch_args(batch) -> tuple[torch.Tensor, ...]:
    return (
        t(batch["features"]),
        t(batch["audio_mask"]).float(),
        t(batch["notes"]),
        t(batch["leadsheet_mask"]),
        t(batch["pad_mask"]),
    )


def torch_losses(ref: Stage1Torch, batch) -> dict[str, torch.Tensor]:
    return ref(*torch_args(batch), t(NEG_SYMBO), t(NEG_AUDIO))


def _losses(graphdef, trainable, rest, batch, field_mean, negatives):
    model = nnx.merge(graphdef, trainable, rest)
    return model.losses(
        batch["notes"],
        batch["leadsheet_mask"],
        batch["pad_mask"],
        batch["audio_mask"],
        features=batch["features"],
        negatives=negatives,
        field_mean=field_mean,
    )


_value_and_grad = jax.jit(
    jax.value_and_grad(_losses, argnums=1, has_aux=True), static_argnums=(0, 4)
)
_forward = jax.jit(_losses, static_argnums=(0, 4))


def jax_losses(model: Stage1Model, batch, field_mean: str, *, negatives=None, grad=False):
    """Metrics (and with ``grad`` the gradients of the trainable set) from one jitted call."""
    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    negatives = tuple(jnp.asarray(i) for i in negatives or (NEG_SYMBO, NEG_AUDIO))
    if grad:
        (_, metrics), grads = _value_and_grad(
            graphdef, trainable, rest, arrays, field_mean, negatives
        )
        return metrics, grads
    return _forward(graphdef, trainable, rest, arrays, field_mean, negatives)[1], None


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _call(graphdef, state, method, kwargs):
    return getattr(nnx.merge(graphdef, state), method)(**kwargs)


def call(model: nnx.Module, method: str, **kwargs):
    """``model.<method>(**kwargs)`` under one jax.jit (split once, merge inside the trace)."""
    graphdef, state = nnx.split(model)
    kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    return _call(graphdef, state, method, kwargs)


def close(ours, theirs, tol=TOL):
    ours = np.asarray(ours)
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    diff = float(np.max(np.abs(ours - theirs)))
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol}"


@pytest.mark.parametrize("field_mean", ["official", "valid"])
def test_losses_match_official_reference(models, batch, field_mean):
    ref, model = models
    with torch.no_grad():
        want = torch_losses(ref, batch)
    got, grads = jax_losses(model, batch, field_mean, grad=field_mean == "official")
    suffix = "" if field_mean == "official" else "_valid"
    close(got["itc"], want["itc"])
    close(got["itm"], want["itm"])
    close(got["itg"], want["itg" + suffix])
    fields = [got[f"itg_{name}"] for name in losses.FIELD_NAMES]
    close(np.stack(fields), want["itg_fields" + suffix])
    close(got["loss"], want["loss" + suffix])
    # the batch has ignored slots, so the two means really differ
    assert abs(want["itg"].item() - want["itg_valid"].item()) > 1e-2
    # the test can see a mix-up of the two negative directions (audio vs symbolic negatives)
    with torch.no_grad():
        swapped = ref(*torch_args(batch), t(NEG_AUDIO), t(NEG_SYMBO))["itm"]
    assert abs(swapped.item() - want["itm"].item()) > 10 * TOL


# official parameter name -> (Stage1Model path, transposed)
GRADIENT_CHECKS = {
    "temp": ("temp", False),
    "query_tokens": ("qformer.query_tokens", False),
    "layer_norm.weight": ("audio_layer_norm.scale", False),
    "audio_proj.weight": ("audio_proj.kernel", True),
    "symbo_proj.weight": ("symbo_proj.kernel", True),
    "binary_head.weight": ("binary_head.kernel", True),
    "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (
        "qformer.layers.0.cross_attn.k_proj.kernel",
        True,
    ),
    "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight": (
        "qformer.layers.1.query_mlp.fc1.kernel",
        True,
    ),
    "Qformer.bert.embeddings.word_embeddings.weight": (
        "qformer.word_embeddings.embedding",
        False,
    ),
    "Qformer.cls.predictions.decoder.weight": ("qformer.lm_head.decoder.kernel", True),
}


def _at(tree, path: str):
    for part in path.split("."):
        tree = tree[int(part)] if part.isdigit() and int(part) in tree else tree[part]
    return np.asarray(tree[...])


def test_gradients_of_the_trainable_set_match_torch_autograd(models, batch):
    ref, model = models
    ref.zero_grad()
    torch_losses(ref, batch)["loss"].backward()
    _, grads = jax_losses(model, batch, "official", grad=True)
    params = dict(ref.named_parameters())
    for name, (path, transposed) in GRADIENT_CHECKS.items():
        want = params[name].grad.numpy()
        want = want.T if transposed else want
        got = _at(grads, path)
        scale = float(np.max(np.abs(want)))
        assert scale > 0, name
        rel = float(np.max(np.abs(got - want))) / scale
        assert rel <= 1e-4, f"{name}: relative gradient difference {rel:.3g}"
    # the pad row of the word table gets no gradient (torch padding_idx)
    assert np.all(_at(grads, "qformer.word_embeddings.embedding")[Q.pad_token_id] == 0)


def test_retrieval_similarity_is_the_untempered_a2s_matrix(models, batch):
    ref, model = models
    with torch.no_grad():
        want = torch_losses(ref, batch)["sim_i2t"] * ref.temp
    got = call(
        model,
        "retrieval_similarity",
        audio_mask=batch["audio_mask"],
        notes=batch["notes"],
        leadsheet_mask=batch["leadsheet_mask"],
        pad_mask=batch["pad_mask"],
        features=batch["features"],
    )
    close(got, want)


def test_sampled_negatives_are_used_and_never_positive(models, batch):
    _, model = models
    inputs = {k: batch[k] for k in ("notes", "leadsheet_mask", "pad_mask", "audio_mask")}
    inputs["features"] = batch["features"]
    for seed in range(3):
        loss, metrics = call(model, "losses", rng=jax.random.key(seed), **inputs)
        neg_symbo = np.asarray(metrics["neg_symbo_idx"])
        neg_audio = np.asarray(metrics["neg_audio_idx"])
        assert neg_symbo.shape == neg_audio.shape == (B,)
        assert not np.any(neg_symbo == np.arange(B)) and not np.any(neg_audio == np.arange(B))
        again, _ = jax_losses(model, batch, "valid", negatives=(neg_symbo, neg_audio))
        np.testing.assert_allclose(float(loss), float(again["loss"]), atol=1e-6)


def test_codes_path_equals_cached_features():
    """With MusicGen inside, losses from codes = losses from MusicGen's features (the cache)."""
    model = Stage1Model(Q, CFG.musicgen, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    notes, ls_mask, pad_mask = note_batch(rng)
    codes = jnp.asarray(rng.integers(0, 2048, (B, 4, S - 4)))
    args = (notes, ls_mask, pad_mask, np.ones((B, S), np.int64))
    negatives = (jnp.asarray(NEG_SYMBO), jnp.asarray(NEG_AUDIO))
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state):
        m = nnx.merge(graphdef, state)
        from_codes, _ = m.losses(*args, codes=codes, negatives=negatives)
        from_features, _ = m.losses(*args, features=m.musicgen(codes), negatives=negatives)
        return from_codes, from_features

    from_codes, from_features = both(state)
    np.testing.assert_allclose(float(from_codes), float(from_features), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model.audio_features(codes=codes, features=jnp.zeros((B, S, Q.encoder_width)))
    with pytest.raises(ValueError, match="without MusicGen"):
        Stage1Model(Q, None, rngs=nnx.Rngs(0)).audio_features(codes=codes)


def test_trainable_filter_freezes_only_musicgen():
    model = nnx.eval_shape(lambda: Stage1Model(Q, CFG.musicgen, rngs=nnx.Rngs(0)))
    _, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    assert set(nnx.to_pure_dict(frozen)) == {"musicgen"}
    assert set(nnx.to_pure_dict(trainable)) == {
        "audio_layer_norm",
        "qformer",
        "audio_proj",
        "symbo_proj",
        "binary_head",
        "temp",
    }


def test_paper_trainable_parameter_count():
    """SPEC 2.3: 186,378,712 trainable parameters in stage 1."""
    model = nnx.eval_shape(lambda: Stage1Model(load_config("paper").qformer, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))
    assert count == 186_378_712


def test_loss_fn_dropout_follows_the_rng(models, batch):
    """stage1_loss_fn (the training step's loss_fn) trains with dropout: the same key gives the
    same loss, another key another one; deterministic=True gives the parity loss."""
    del models
    # one layer and hidden dropout only: the attention-dropout graph takes ~4x longer to compile
    # (the Q-Former's own tests cover attention dropout)
    small = dataclasses.replace(Q, num_hidden_layers=1, hidden_dropout=0.1, attention_dropout=0.0)
    graphdef, state = nnx.split(Stage1Model(small, None, rngs=nnx.Rngs(0)))
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}

    @functools.partial(jax.jit, static_argnums=2)
    def loss_fn(state, rng, deterministic):
        return stage1_loss_fn(nnx.merge(graphdef, state), arrays, rng, deterministic=deterministic)

    (loss_a, metrics), (loss_b, _), (loss_c, _) = (
        loss_fn(state, jax.random.key(k), False) for k in (0, 0, 1)
    )
    assert float(loss_a) == float(loss_b) and float(loss_a) != float(loss_c)
    assert "neg_symbo_idx" not in metrics and set(metrics) >= {"loss", "itc", "itm", "itg", "temp"}
    assert np.isfinite(float(loss_a))


def test_remat_changes_memory_not_numbers(models, batch):
    """``qformer.remat`` recomputes layer activations in the backward pass: same loss and
    gradients as storing them. The stored side is the call the parity tests above compiled
    (official field mean, gradients), so a worker that ran them compiles only the remat side."""
    _, model = models
    remat = Stage1Model(dataclasses.replace(Q, remat=True), None, rngs=nnx.Rngs(1))
    nnx.update(remat, nnx.state(model))
    want_metrics, want = jax_losses(model, batch, "official", grad=True)
    got_metrics, got = jax_losses(remat, batch, "official", grad=True)
    np.testing.assert_allclose(float(got_metrics["loss"]), float(want_metrics["loss"]), rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_remat_with_dropout_on_gives_the_same_losses_and_gradients(batch):
    """With dropout on and a fixed dropout key, ``qformer.remat`` recomputes exactly the masks of
    the forward pass: the same losses and gradients as storing the activations. Hidden dropout
    draws its keys from the same per-pass counter as attention dropout, so a recomputation that
    drifted would show here; one layer (with cross-attention) and no attention dropout keep the
    two compiles short (attention dropout makes them ~2x slower)."""
    drop = dataclasses.replace(Q, num_hidden_layers=1, hidden_dropout=0.1, attention_dropout=0.0)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_and_grads(qcfg):
        graphdef, trainable, rest = nnx.split(
            Stage1Model(qcfg, None, rngs=nnx.Rngs(1)), TRAINABLE, ...
        )

        def loss(trainable, rng):
            return stage1_loss_fn(nnx.merge(graphdef, trainable, rest), arrays, rng)

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return lambda seed: step(trainable, jax.random.key(seed))

    stored, remat = loss_and_grads(drop), loss_and_grads(dataclasses.replace(drop, remat=True))
    (want, want_metrics), want_grads = stored(7)
    (got, got_metrics), got_grads = remat(7)
    (other, _), _ = stored(8)
    assert float(want) != float(other)  # dropout is on: another key, another loss
    for name in ("loss", "itc", "itm", "itg"):
        np.testing.assert_allclose(float(got_metrics[name]), float(want_metrics[name]), rtol=1e-6)
    leaves = jax.tree_util.tree_leaves_with_path(got_grads)
    for (path, g), w in zip(leaves, jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_official_preset_gives_the_official_losses(models, batch):
    """configs/official.yaml's stage-1 loss function equals the official reference's total loss
    (official ITG field mean); paper.yaml's (our corrected mean) does not (issue 8 item 4b)."""
    from bossa_jax.train.stage1 import make_loss_fn

    ref, model = models
    key = jax.random.key(3)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=0)
    def run(loss_fn, state):
        m = nnx.merge(graphdef, state)
        _, with_negatives = m.losses(
            arrays["notes"],
            arrays["leadsheet_mask"],
            arrays["pad_mask"],
            arrays["audio_mask"],
            features=arrays["features"],
            rng=key,
        )
        loss, _ = loss_fn(m, arrays, key)
        return loss, (with_negatives["neg_symbo_idx"], with_negatives["neg_audio_idx"])

    official, negatives = run(make_loss_fn(load_config("official").stage1, train=False), state)
    paper, _ = run(make_loss_fn(load_config("paper").stage1, train=False), state)
    with torch.no_grad():
        want = ref(*torch_args(batch), *(t(np.array(i)) for i in negatives))
    close(official, want["loss"])
    assert abs(float(paper) - want["loss"].item()) > 1e-2
    close(paper, want["loss_valid"])


def test_stage1_losses_option_trains_only_the_named_losses(batch):
    """``stage1.losses`` (paper Table 2's ablations C, C+M, and a G subset): the step's loss is
    the sum of the named losses only, each equal to its value in the full loss (same key, so the
    same ITM negatives); the others are not computed (not reported)."""
    from bossa_jax.train.stage1 import make_loss_fn

    # one layer: compile time dominates (the parity tests above cover the losses themselves)
    small = dataclasses.replace(Q, num_hidden_layers=1)
    graphdef, state = nnx.split(Stage1Model(small, None, rngs=nnx.Rngs(2)))
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}

    @functools.partial(jax.jit, static_argnums=0)
    def run(loss_fn, state):
        return loss_fn(nnx.merge(graphdef, state), arrays, jax.random.key(5))

    full_cfg = load_config("tiny").stage1
    assert full_cfg.losses == ("itc", "itm", "itg")
    full, want = run(make_loss_fn(full_cfg, train=False), state)
    assert abs(float(full) - sum(float(want[n]) for n in ("itc", "itm", "itg"))) < 1e-5
    for objectives in (("itc",), ("itc", "itm"), ("itm", "itg")):
        sub_cfg = load_config("tiny", [f"stage1.losses=[{', '.join(objectives)}]"]).stage1
        assert sub_cfg.losses == objectives
        total, got = run(make_loss_fn(sub_cfg, train=False), state)
        for name in ("itc", "itm", "itg"):
            assert (name in got) == (name in objectives), (objectives, name)
            if name in objectives:
                np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-6)
        want_total = sum(float(got[n]) for n in objectives)
        np.testing.assert_allclose(float(total), want_total, rtol=1e-6)
        assert abs(float(total) - float(full)) > 1e-3  # the left-out losses are really gone


def test_stage1_losses_option_is_checked():
    from bossa_jax.errors import ConfigError

    for bad, says in (("[]", "at least one"), ("[itc, itc]", "twice"), ("[itx]", "one of")):
        with pytest.raises(ConfigError, match="stage1.losses") as err:
            load_config("tiny", [f"stage1.losses={bad}"])
        assert says in str(err.value)
