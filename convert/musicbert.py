"""MusicBERT-base (fairseq) -> the BOSSA Q-Former, as ``init_Qformer(load_pretrained=True)`` does it
(SPEC 2.3, 10.23; DESIGN "Converters").

    python -m convert.musicbert checkpoint_last_musicbert_base.pt OUT [--config paper] [--seed 0]

Two explicit tables, applied in order:

1. :data:`MUSICBERT_RENAMES`: the official substring renames fairseq -> official BOSSA names
   (SPEC 2.3), e.g. ``encoder.sentence_encoder.layers.3.fc1.weight`` ->
   ``bert.encoder.layer.3.intermediate.dense.weight``.
2. :func:`official_qformer_rules`: official BOSSA Q-Former names -> bossa-jax parameter paths
   (kernels transposed). ``convert/bossa.py`` reuses it for released stage-1/stage-2 files.

Then, as the official code: the query FFN (``intermediate_query``/``output_query``) is copied from
the text FFN; cross-attention layers and the query tokens keep a fresh BERT init (normal 0.02, zero
bias, LayerNorm 1/0); the word table gets row ``vocab_size`` = [DEC] = the exact mean of the loaded
rows (pad row included); the position table is copied unchanged and indexed by note 0..N-1 (fairseq
indexed it from padding_idx + 1 = 2; SPEC 2.3 / 10.23). The LayerNorm eps is BOSSA's (1e-12 from
bert-base), not MusicBERT's 1e-5.

Only a fairseq checkpoint dict is accepted: ``{"model": state dict, "args": Namespace}`` (or a plain
``"cfg"`` mapping instead of ``args``), read with ``torch.load(weights_only=True)`` and the
allowlist of ``convert.common``; keys neither used nor listed in :data:`IGNORED_SUFFIXES` /
:data:`IGNORED_PREFIXES` are reported by name, as are missing keys and wrong shapes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from bossa_jax.checkpoint import save_module
from bossa_jax.cli import ArgumentParser, add_output_options
from bossa_jax.config import QFormerConfig, build, load_config
from bossa_jax.errors import CheckpointError, ConfigError, run_cli
from bossa_jax.models.qformer import FIELDS_PER_NOTE, QFormer
from bossa_jax.outputs import check_output
from convert.common import (
    TensorReader,
    check_keys,
    check_missing,
    fill,
    param_paths,
    read_fairseq_checkpoint,
)

# SPEC 2.3's table, in its order: substring replacements fairseq MusicBERT -> official BOSSA.
MUSICBERT_RENAMES: tuple[tuple[str, str], ...] = (
    ("encoder.sentence_encoder.layers", "bert.encoder.layer"),
    ("self_attn.q_proj", "attention.self.query"),
    ("self_attn.k_proj", "attention.self.key"),
    ("self_attn.v_proj", "attention.self.value"),
    ("self_attn.out_proj", "attention.output.dense"),
    ("self_attn_layer_norm", "attention.output.LayerNorm"),
    ("fc1", "intermediate.dense"),
    ("fc2", "output.dense"),
    ("final_layer_norm", "output.LayerNorm"),
    ("encoder.sentence_encoder.embed_tokens", "bert.embeddings.word_embeddings"),
    ("encoder.sentence_encoder.embed_positions", "bert.embeddings.position_embeddings"),
    ("encoder.sentence_encoder.emb_layer_norm", "bert.embeddings.LayerNorm"),
    ("encoder.sentence_encoder.downsampling.0", "bert.embeddings.downsampling"),
    ("encoder.sentence_encoder.upsampling.0", "upsampling"),
    ("encoder.lm_head.dense", "cls.predictions.transform.dense"),
    ("encoder.lm_head.layer_norm", "cls.predictions.transform.LayerNorm"),
    ("encoder.lm_head.weight", "cls.predictions.decoder.weight"),
    ("encoder.lm_head.bias", "cls.predictions.decoder.bias"),
)
# fairseq bookkeeping and fine-tuning heads: present in some checkpoints, unused by BOSSA
IGNORED_SUFFIXES = (".version", "._float_tensor")
IGNORED_PREFIXES = ("classification_heads.",)
WORD_TABLE = "bert.embeddings.word_embeddings.weight"
_LAYER = re.compile(r"^encoder\.sentence_encoder\.layers\.(\d+)\.")


def musicbert_keys(num_layers: int) -> list[str]:
    """Every fairseq key the conversion reads (the MusicBERT-base state dict minus bookkeeping)."""
    enc = "encoder.sentence_encoder"
    keys = [f"{enc}.embed_tokens.weight", f"{enc}.embed_positions.weight"]
    modules = [f"{enc}.emb_layer_norm", f"{enc}.downsampling.0", f"{enc}.upsampling.0"]
    modules += ["encoder.lm_head.dense", "encoder.lm_head.layer_norm"]
    for i in range(num_layers):
        modules += [f"{enc}.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        modules += [
            f"{enc}.layers.{i}.{m}"
            for m in (
                "self_attn.out_proj",
                "self_attn_layer_norm",
                "fc1",
                "fc2",
                "final_layer_norm",
            )
        ]
    keys += [f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")]
    return keys + ["encoder.lm_head.weight", "encoder.lm_head.bias"]


def rename_musicbert_key(key: str) -> str:
    """One fairseq key -> its official BOSSA name (unchanged when no fragment matches)."""
    for old, new in MUSICBERT_RENAMES:
        key = key.replace(old, new)
    return key


# -- official BOSSA names -> bossa-jax parameters --------------------------------------------

Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _linear(rules: dict[str, Rule], ours: str, theirs: str) -> None:
    rules[f"{ours}.kernel"] = (f"{theirs}.weight", _transpose)
    rules[f"{ours}.bias"] = (f"{theirs}.bias", _same)


def _norm(rules: dict[str, Rule], ours: str, theirs: str) -> None:
    rules[f"{ours}.scale"] = (f"{theirs}.weight", _same)
    rules[f"{ours}.bias"] = (f"{theirs}.bias", _same)


def official_qformer_rules(
    cfg: QFormerConfig, *, prefix: str = "", query_tokens: str | None = "query_tokens"
) -> dict[str, Rule]:
    """bossa-jax parameter path -> (official key, transform) for the whole Q-Former.

    ``prefix`` is put before every ``BertLMHeadModel`` key (``"Qformer."`` in stage-1 files);
    ``query_tokens`` names the official query parameter (None: leave it out of the table).
    With ``cfg.symbolic_branch`` False the table covers the stage-2 Q-Former only (no word or
    position embeddings, downsampling, text FFNs or LM head: SPEC 4.1).
    """
    r: dict[str, Rule] = {}
    symbolic = cfg.symbolic_branch  # False: the stage-2 Q-Former, note stream deleted (SPEC 4.1)
    if symbolic:
        r["word_embeddings.embedding"] = (f"{prefix}bert.embeddings.word_embeddings.weight", _same)
        r["position_embeddings.embedding"] = (
            f"{prefix}bert.embeddings.position_embeddings.weight",
            _same,
        )
        _linear(r, "downsampling", f"{prefix}bert.embeddings.downsampling")
    _norm(r, "embed_norm", f"{prefix}bert.embeddings.LayerNorm")
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"layers.{i}", f"{prefix}bert.encoder.layer.{i}"
        attn = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
        blocks = [("self_attn", "attention")]
        if i % cfg.cross_attention_freq == 0:
            blocks.append(("cross_attn", "crossattention"))
        for our_block, their_block in blocks:
            for our_proj, their_proj in attn.items():
                _linear(
                    r, f"{ours}.{our_block}.{our_proj}", f"{theirs}.{their_block}.self.{their_proj}"
                )
            _linear(r, f"{ours}.{our_block}.out_proj", f"{theirs}.{their_block}.output.dense")
            _norm(r, f"{ours}.{our_block}_norm", f"{theirs}.{their_block}.output.LayerNorm")
        ffns = (("text", ""), ("query", "_query")) if symbolic else (("query", "_query"),)
        for our_ffn, suffix in ffns:
            _linear(r, f"{ours}.{our_ffn}_mlp.fc1", f"{theirs}.intermediate{suffix}.dense")
            _linear(r, f"{ours}.{our_ffn}_mlp.fc2", f"{theirs}.output{suffix}.dense")
            _norm(r, f"{ours}.{our_ffn}_norm", f"{theirs}.output{suffix}.LayerNorm")
    if symbolic:
        _linear(r, "lm_head.upsampling", f"{prefix}upsampling")
        _linear(r, "lm_head.dense", f"{prefix}cls.predictions.transform.dense")
        _norm(r, "lm_head.norm", f"{prefix}cls.predictions.transform.LayerNorm")
        _linear(r, "lm_head.decoder", f"{prefix}cls.predictions.decoder")
    if query_tokens is not None:
        r["query_tokens"] = (query_tokens, _same)
    return r


def values_from_official(
    model: nnx.Module,
    read: Callable[[str], np.ndarray],
    rules: Mapping[str, Rule],
    *,
    source: str,
    original_names: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Reads every rule's key with ``read`` and checks its shape against the model's parameter;
    a mismatch names the source key (``original_names`` maps official -> upstream names)."""
    params = param_paths(model)
    values = {}
    for path, (key, transform) in rules.items():
        value = transform(np.asarray(read(key)))
        expected = tuple(params[path].shape)
        if value.shape != expected:
            name = (original_names or {}).get(key, key)
            found = np.asarray(read(key)).shape
            want = expected[::-1] if transform is _transpose else expected
            raise CheckpointError(
                f"{source}: shape mismatch for '{name}': expected {want}, found {found}"
            )
        values[path] = value
    return values


# -- reading the fairseq checkpoint ----------------------------------------------------------


def infer_config(
    tensors: Mapping[str, np.ndarray], args: Mapping[str, Any], base: QFormerConfig, source: str
) -> QFormerConfig:
    """The Q-Former sizes a MusicBERT checkpoint implies (encoder_width, queries, cross-attention
    frequency, eps and dropout come from ``base``); contradictions name the key."""
    emb_key = "encoder.sentence_encoder.embed_tokens.weight"
    pos_key = "encoder.sentence_encoder.embed_positions.weight"
    fc1_key = "encoder.sentence_encoder.layers.0.fc1.weight"
    for key in (emb_key, pos_key, fc1_key):
        if key not in tensors:
            raise CheckpointError(f"{source}: missing key '{key}' (not a MusicBERT checkpoint?)")
    vocab, hidden = tensors[emb_key].shape
    if vocab != base.vocab_size:
        raise CheckpointError(
            f"{source}: '{emb_key}' has {vocab} rows, BOSSA's octuple dictionary has "
            f"{base.vocab_size} (qformer.vocab_size)"
        )
    layers = 1 + max(int(m.group(1)) for k in tensors if (m := _LAYER.match(k)))
    heads = args.get("encoder_attention_heads")
    if not isinstance(heads, int):
        raise CheckpointError(f"{source}: args.encoder_attention_heads missing or not an integer")
    expected = {
        "encoder_embed_dim": hidden,
        "encoder_layers": layers,
        "encoder_ffn_embed_dim": tensors[fc1_key].shape[0],
    }
    for name, value in expected.items():
        if name in args and args[name] != value:
            raise CheckpointError(
                f"{source}: args.{name} = {args[name]} but the weights imply {value}"
            )
    if "activation_fn" in args and args["activation_fn"] != "gelu":
        raise CheckpointError(f"{source}: args.activation_fn = {args['activation_fn']!r}, not gelu")
    cfg = dataclasses.replace(
        base,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=expected["encoder_ffn_embed_dim"],
        max_position_embeddings=tensors[pos_key].shape[0],
    )
    try:
        cfg.validate("qformer")
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err
    return cfg


def convert_musicbert(
    path: str | Path, base: QFormerConfig | None = None, *, seed: int = 0
) -> tuple[QFormer, QFormerConfig]:
    """Builds the MusicBERT-initialised Q-Former of SPEC 2.3 from a fairseq checkpoint file."""
    source = str(path)
    tensors, args = read_fairseq_checkpoint(path)
    cfg = infer_config(tensors, args, base or QFormerConfig(), source)

    check_missing(tensors, musicbert_keys(cfg.num_hidden_layers), source=source)
    original_names = {rename_musicbert_key(key): key for key in tensors}
    official = tensors.view(original_names)
    # the query FFN starts as a copy of the text FFN (SPEC 2.3)
    for i in range(cfg.num_hidden_layers):
        base_key = f"bert.encoder.layer.{i}"
        for part in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            query_part = part.replace("intermediate", "intermediate_query").replace(
                "output", "output_query"
            )
            for leaf in ("weight", "bias"):
                text = f"{base_key}.{part}.{leaf}"
                if text in official:
                    official.define(f"{base_key}.{query_part}.{leaf}", official.loader(text))
                    original_names[f"{base_key}.{query_part}.{leaf}"] = original_names[text]
    # row vocab_size = [DEC] = exact mean of the loaded rows (SPEC 2.3; HF 4.48 mean-resizing), in
    # the fp32 the Q-Former holds them
    if WORD_TABLE in official:
        read_table = official.loader(WORD_TABLE)

        def with_dec_row() -> np.ndarray:
            table = np.asarray(read_table(), np.float32)
            dec = table.astype(np.float64).mean(axis=0).astype(np.float32)
            return np.concatenate([table, dec[None]], axis=0)

        official.define(WORD_TABLE, with_dec_row)

    model = QFormer(cfg, rngs=nnx.Rngs(seed))
    rules = official_qformer_rules(cfg, query_tokens=None)
    fresh = {
        path: (path, _same)
        for path in param_paths(model)
        if ".cross_attn" in path or path == "query_tokens"
    }
    loaded = {path: rule for path, rule in rules.items() if path not in fresh}
    reader = TensorReader(official, source)
    values = values_from_official(
        model, reader, loaded, source=source, original_names=original_names
    )
    current = {path: np.asarray(var[...]) for path, var in param_paths(model).items()}
    values.update({path: current[path] for path in fresh})
    fill(model, values, source=source)

    # the query FFN copies are read through their own rules, not as checkpoint keys
    copies = {k for k in official if "_query" in k}
    check_keys(
        official,
        reader.used | copies,
        source=source,
        ignore_prefixes=IGNORED_PREFIXES,
        ignore_suffixes=IGNORED_SUFFIXES,
        names=original_names,
    )
    return model, cfg


CHECKPOINT_KIND = "qformer checkpoint"


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m convert.musicbert",
        description="MusicBERT-base (fairseq .pt) -> bossa-jax Q-Former checkpoint (SPEC 2.3).",
    )
    parser.add_argument("source", help="fairseq checkpoint, e.g. checkpoint_last_musicbert_base.pt")
    parser.add_argument("output", help="output directory (bossa-jax checkpoint)")
    parser.add_argument(
        "--config", default="paper", help="config giving the qformer section (default: paper)"
    )
    parser.add_argument("--seed", type=int, default=0, help="init seed of cross-attn and queries")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    add_output_options(parser)
    args = parser.parse_args(argv)
    check_output(
        args.output, CHECKPOINT_KIND, folder=True, overwrite=args.overwrite, sources=[args.source]
    )
    base = load_config(args.config, args.overrides).qformer
    model, cfg = convert_musicbert(args.source, base, seed=args.seed)
    config = {"name": "musicbert", "qformer": dataclasses.asdict(cfg)}
    build(QFormerConfig, config["qformer"], "qformer")  # what a loader will do with it
    save_module(args.output, model, config, kind=CHECKPOINT_KIND, overwrite=args.overwrite)
    print(
        f"wrote {args.output}: Q-Former {cfg.num_hidden_layers}x{cfg.hidden_size} "
        f"({cfg.num_attention_heads} heads) from {args.source}; fresh cross-attention in "
        f"{len(range(0, cfg.num_hidden_layers, cfg.cross_attention_freq))} layers and "
        f"{cfg.num_query_tokens} query tokens (seed {args.seed}); [DEC] row "
        f"{cfg.dec_token_id} = mean of the {cfg.vocab_size} rows; "
        f"{FIELDS_PER_NOTE} ids per note"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
