"""MusicGen decoder -> bossa-jax ``MusicgenFeatures`` checkpoint (SPEC 1.2-1.3; DESIGN "Converters")

Sources:

* HF ``MusicgenForConditionalGeneration`` (keys under ``decoder.model.decoder.``; what BOSSA loads
  from ``facebook/musicgen-large``), ``MusicgenForCausalLM`` (``model.decoder.``) or
  ``MusicgenModel`` (``decoder.``): a directory (config.json + safetensors / pytorch_model.bin) or
  a state dict. The text encoder, the audio encoder, ``enc_to_dec_proj``, the LM heads, the
  cross-attention weights (they add exactly zero in BOSSA, SPEC 1.2) and blocks >= ``keep_layers``
  are ignored; any other key is reported as unexpected.
* audiocraft's LM state dict (``state_dict.bin`` of the audiocraft MusicGen releases, tensors under
  ``best_state``): ``emb.K`` -> embedding tables, ``transformer.layers.N.self_attn.in_proj_weight``
  (fused q, k, v rows) -> q/k/v, ``out_proj``, ``linear1``/``linear2`` -> FFN, ``norm1``/``norm2``
  -> the two block LayerNorms, ``out_norm`` -> the final LayerNorm. audiocraft's
  ``create_sin_embedding`` is the same cos-first sinusoid as HF's (``10000 ** (-i / (d/2 - 1))``)
  and MusicGen uses ``positional_scale`` 1, so no position parameter is converted.
  ``cross_attention.*``, ``norm_cross``, ``linears.K`` (output heads), ``condition_provider.*`` and
  ``fuser.*`` are ignored. The head count comes from the file's ``xp.cfg``
  (``transformer_lm.num_heads``) when it holds one.
* The official BOSSA stage-1 file (``bossa_stage1.pt``, SPEC 7): the HF decoder under
  ``musicgen_decoder.decoder.``; every key outside ``musicgen_decoder.`` (the Q-Former, the heads,
  ``musicgen_enc_to_dec_proj``) is the rest of BOSSA and ignored here.

Nothing is guessed: the head count comes from config.json, ``xp.cfg`` or ``--num-heads``
(``num_heads=``), and a state dict that holds none without ``--num-heads`` is refused (the other
sizes are read off the tensor shapes). Tensors are read one at a time (``convert.common``) and keep
the source's dtype unless ``--dtype`` asks for another.

Every Flax parameter must receive a value of exactly its shape (a mismatch names the key); source
keys neither used nor deliberately ignored are reported by name. :func:`to_hf_state_dict` exports
back to the HF layout for round trips.

Command: ``python -m convert.musicgen SRC OUT [--keep-layers 25] [--format auto|hf|audiocraft]
[--num-heads N] [--dtype float32|bfloat16]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from flax import nnx

from bossa_jax.cli import ArgumentParser, add_output_options
from bossa_jax.config import DTYPES, MusicgenConfig
from bossa_jax.errors import CheckpointError, ConfigError, run_cli
from bossa_jax.models.musicgen import (
    CHECKPOINT_KIND,
    MusicgenFeatures,
    load_musicgen,
    save_musicgen,
)
from bossa_jax.outputs import check_output

__all__ = ["convert_musicgen", "load_musicgen", "save_musicgen", "to_hf_state_dict"]
from convert.common import TensorReader, fill, param_paths, read_checkpoint, read_hf_config

# the official BOSSA stage-1 layout first: its keys also end in "decoder.embed_tokens..."
OFFICIAL_PREFIX = "musicgen_decoder.decoder."
HF_PREFIXES = (OFFICIAL_PREFIX, "decoder.model.decoder.", "model.decoder.", "decoder.", "")
# HF modules outside the decoder body that BOSSA's features never use.
HF_IGNORED = (
    "text_encoder.",
    "audio_encoder.",
    "enc_to_dec_proj.",
    "decoder.lm_heads.",
    "lm_heads.",
)
AUDIOCRAFT_IGNORED = ("linears.", "condition_provider.", "fuser.")
EMBED = "embed_tokens.embedding"  # the codebook tables, concatenated

# (Flax path inside one stacked block, HF name inside ``layers.N.``, is a kernel (transpose))
HF_BLOCK_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("self_attn.q_proj.kernel", "self_attn.q_proj.weight", True),
    ("self_attn.k_proj.kernel", "self_attn.k_proj.weight", True),
    ("self_attn.v_proj.kernel", "self_attn.v_proj.weight", True),
    ("self_attn.out_proj.kernel", "self_attn.out_proj.weight", True),
    ("self_attn_layer_norm.scale", "self_attn_layer_norm.weight", False),
    ("self_attn_layer_norm.bias", "self_attn_layer_norm.bias", False),
    ("mlp.fc1.kernel", "fc1.weight", True),
    ("mlp.fc2.kernel", "fc2.weight", True),
    ("final_layer_norm.scale", "final_layer_norm.weight", False),
    ("final_layer_norm.bias", "final_layer_norm.bias", False),
)
AUDIOCRAFT_BLOCK_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("self_attn.out_proj.kernel", "self_attn.out_proj.weight", True),
    ("self_attn_layer_norm.scale", "norm1.weight", False),
    ("self_attn_layer_norm.bias", "norm1.bias", False),
    ("mlp.fc1.kernel", "linear1.weight", True),
    ("mlp.fc2.kernel", "linear2.weight", True),
    ("final_layer_norm.scale", "norm2.weight", False),
    ("final_layer_norm.bias", "norm2.bias", False),
)


# ---------------------------------------------------------------------------------------------
# Layout detection and configs


def detect_format(tensors: Mapping[str, np.ndarray]) -> str:
    """'hf' or 'audiocraft' from the key names."""
    if "emb.0.weight" in tensors and any(k.startswith("transformer.layers.") for k in tensors):
        return "audiocraft"
    if hf_prefix(tensors) is not None:
        return "hf"
    raise CheckpointError(
        "checkpoint is neither an HF MusicGen (…decoder.embed_tokens.0.weight) nor an audiocraft "
        "LM (emb.0.weight, transformer.layers.*) state dict"
    )


def hf_prefix(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The HF prefix under which the decoder keys lie (None: no HF MusicGen decoder)."""
    for prefix in HF_PREFIXES:
        if f"{prefix}embed_tokens.0.weight" in tensors:
            return prefix
    return None


def _layer_count(tensors: Mapping[str, np.ndarray], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in tensors if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def _shape(tensors: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"{source}: missing key '{key}'")
    return tuple(tensors[key].shape)


def config_from_tensors(
    tensors: Mapping[str, np.ndarray],
    fmt: str,
    *,
    keep_layers: int,
    num_heads: int | None,
    dtype: str,
    source: str,
) -> MusicgenConfig:
    """Sizes read off the tensors (used when no config.json is at hand); the head count, which no
    shape holds, must be given."""
    if num_heads is None:
        raise CheckpointError(
            f"{source}: no config.json or xp.cfg gives the head count: pass --num-heads "
            "(num_heads=; MusicGen small/medium/large: 16/24/32)"
        )
    if fmt == "hf":
        prefix = hf_prefix(tensors) or ""
        rows, hidden = _shape(tensors, f"{prefix}embed_tokens.0.weight", source)
        ffn = _shape(tensors, f"{prefix}layers.0.fc1.weight", source)[0]
        layers = _layer_count(tensors, re.escape(prefix) + r"layers\.(\d+)\.")
        codebooks = _layer_count(tensors, re.escape(prefix) + r"embed_tokens\.(\d+)\.")
    else:
        rows, hidden = _shape(tensors, "emb.0.weight", source)
        ffn = _shape(tensors, "transformer.layers.0.linear1.weight", source)[0]
        layers = _layer_count(tensors, r"transformer\.layers\.(\d+)\.")
        codebooks = _layer_count(tensors, r"emb\.(\d+)\.")
    return _make_config(
        source,
        hidden_size=hidden,
        num_attention_heads=num_heads,
        ffn_dim=ffn,
        num_codebooks=codebooks,
        vocab_size=rows - 1,
        num_hidden_layers=layers,
        keep_layers=keep_layers,
        dtype=dtype,
    )


def config_from_hf(
    hf_config: Mapping[str, Any], *, keep_layers: int, dtype: str, source: str
) -> MusicgenConfig:
    """MusicgenConfig from an HF config.json (its ``decoder`` section for the composite model)."""
    dec = hf_config.get("decoder", hf_config)
    try:
        return _make_config(
            source,
            hidden_size=int(dec["hidden_size"]),
            num_attention_heads=int(dec["num_attention_heads"]),
            ffn_dim=int(dec["ffn_dim"]),
            num_codebooks=int(dec.get("num_codebooks", 4)),
            vocab_size=int(dec["vocab_size"]),
            num_hidden_layers=int(dec["num_hidden_layers"]),
            max_position_embeddings=int(dec.get("max_position_embeddings", 2048)),
            keep_layers=keep_layers,
            dtype=dtype,
        )
    except KeyError as err:
        raise CheckpointError(f"{source}: config.json has no decoder key {err}") from err


def _make_config(source: str, **fields: Any) -> MusicgenConfig:
    cfg = MusicgenConfig(**fields)
    try:
        cfg.validate("musicgen")
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err
    return cfg


# ---------------------------------------------------------------------------------------------
# Name tables


def _tables(per_codebook: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(per_codebook, axis=0)


def expected_shapes(cfg: MusicgenConfig) -> dict[str, tuple[int, ...]]:
    """Flax dotted path -> shape, from the abstract model (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: MusicgenFeatures(cfg, rngs=nnx.Rngs(0)))
    return {name: tuple(var.shape) for name, var in param_paths(abstract).items()}


def _checked(
    value: np.ndarray, key: str, want: tuple[int, ...], *, kernel: bool, source: str
) -> np.ndarray:
    """One source tensor in Flax orientation; a wrong shape names the source key."""
    want_source = want[::-1] if kernel else want
    if tuple(value.shape) != want_source:
        raise CheckpointError(
            f"{source}: shape mismatch for '{key}': expected {want_source}, "
            f"found {tuple(value.shape)}"
        )
    return value.T if kernel else value


class _Taker:
    """Reads source tensors into Flax orientation, each checked against the abstract model."""

    def __init__(self, read: TensorReader, cfg: MusicgenConfig, source: str):
        self.read, self.cfg, self.source = read, cfg, source
        self.shapes = expected_shapes(cfg)

    def __call__(
        self, key: str, path: str, *, kernel: bool = False, stacked: bool = False
    ) -> np.ndarray:
        want = self.shapes[path][1:] if stacked else self.shapes[path]
        return _checked(self.read(key), key, want, kernel=kernel, source=self.source)

    def tables(self, key: str) -> np.ndarray:
        """The concatenated codebook table from the per-codebook ``key.format(q=...)`` tables."""
        rows, dim = self.shapes[EMBED]
        want = (rows // self.cfg.num_codebooks, dim)
        return _tables(
            [
                _checked(self.read(k), k, want, kernel=False, source=self.source)
                for k in (key.format(q=q) for q in range(self.cfg.num_codebooks))
            ]
        )

    def blocks(
        self, layer_key: str, table: tuple[tuple[str, str, bool], ...]
    ) -> dict[str, np.ndarray]:
        """The stacked block parameters of the first ``keep_layers`` layers (``layer_key`` takes
        ``{i}``) by the name table."""
        return {
            f"layers.{flax_name}": np.stack(
                [
                    self(
                        layer_key.format(i=i) + name,
                        f"layers.{flax_name}",
                        kernel=kernel,
                        stacked=True,
                    )
                    for i in range(self.cfg.keep_layers)
                ]
            )
            for flax_name, name, kernel in table
        }


def hf_to_flax(
    tensors: Mapping[str, np.ndarray], cfg: MusicgenConfig, *, source: str
) -> dict[str, np.ndarray]:
    """HF decoder tensors -> Flax dotted paths (first ``keep_layers`` blocks); reports leftovers."""
    prefix = hf_prefix(tensors)
    if prefix is None:
        raise CheckpointError(f"{source}: no MusicGen decoder embeddings (…embed_tokens.0.weight)")
    read = TensorReader(tensors, source)
    take = _Taker(read, cfg, source)
    out = {EMBED: take.tables(f"{prefix}embed_tokens.{{q}}.weight")}
    out.update(take.blocks(f"{prefix}layers.{{i}}.", HF_BLOCK_TABLE))
    out["layer_norm.scale"] = take(f"{prefix}layer_norm.weight", "layer_norm.scale")
    out["layer_norm.bias"] = take(f"{prefix}layer_norm.bias", "layer_norm.bias")
    ignored = list(HF_IGNORED)
    if prefix == OFFICIAL_PREFIX:  # the rest of the BOSSA stage-1 model
        ignored += [k for k in tensors if not k.startswith("musicgen_decoder.")]
    ignored += [f"{prefix}layers.{i}.encoder_attn" for i in range(cfg.keep_layers)]
    ignored += [f"{prefix}layers.{i}." for i in range(cfg.keep_layers, cfg.num_hidden_layers)]
    # non-persistent in HF; present in some older exports
    read.check_unused(ignore_prefixes=ignored, ignore_suffixes=("embed_positions.weights",))
    return out


def audiocraft_to_flax(
    tensors: Mapping[str, np.ndarray], cfg: MusicgenConfig, *, source: str
) -> dict[str, np.ndarray]:
    """audiocraft LM tensors -> Flax dotted paths (first ``keep_layers`` blocks)."""
    read = TensorReader(tensors, source)
    take = _Taker(read, cfg, source)
    d = cfg.hidden_size
    out = {EMBED: take.tables("emb.{q}.weight")}
    qkv: dict[str, list[np.ndarray]] = {"q_proj": [], "k_proj": [], "v_proj": []}
    for i in range(cfg.keep_layers):
        key = f"transformer.layers.{i}.self_attn.in_proj_weight"
        fused = _checked(read(key), key, (3 * d, d), kernel=False, source=source)
        for j, name in enumerate(qkv):
            qkv[name].append(fused[j * d : (j + 1) * d].T)
    for name, per_layer in qkv.items():
        out[f"layers.self_attn.{name}.kernel"] = np.stack(per_layer)
    out.update(take.blocks("transformer.layers.{i}.", AUDIOCRAFT_BLOCK_TABLE))
    out["layer_norm.scale"] = take("out_norm.weight", "layer_norm.scale")
    out["layer_norm.bias"] = take("out_norm.bias", "layer_norm.bias")
    ignored = list(AUDIOCRAFT_IGNORED)
    for i in range(cfg.keep_layers):
        ignored += [
            f"transformer.layers.{i}.cross_attention.",
            f"transformer.layers.{i}.norm_cross.",
        ]
    ignored += [f"transformer.layers.{i}." for i in range(cfg.keep_layers, cfg.num_hidden_layers)]
    read.check_unused(ignore_prefixes=ignored)
    return out


def to_hf_state_dict(
    model: MusicgenFeatures, prefix: str = "decoder.model.decoder."
) -> dict[str, np.ndarray]:
    """The kept decoder in HF layout (fp32 numpy), e.g. to ``load_state_dict(strict=False)`` into
    a truncated HF model: cross-attention weights and LM heads are not part of it."""
    params = {name: np.asarray(var[...], np.float32) for name, var in param_paths(model).items()}
    out: dict[str, np.ndarray] = {}
    tables = np.split(params[EMBED], model.cfg.num_codebooks, axis=0)
    for q, table in enumerate(tables):
        out[f"{prefix}embed_tokens.{q}.weight"] = np.ascontiguousarray(table)
    for flax_name, hf_name, kernel in HF_BLOCK_TABLE:
        stacked = params[f"layers.{flax_name}"]
        for i in range(stacked.shape[0]):
            value = stacked[i]
            out[f"{prefix}layers.{i}.{hf_name}"] = np.ascontiguousarray(
                value.T if kernel else value
            )
    out[f"{prefix}layer_norm.weight"] = params["layer_norm.scale"]
    out[f"{prefix}layer_norm.bias"] = params["layer_norm.bias"]
    return out


# ---------------------------------------------------------------------------------------------
# Entry points


def convert_musicgen(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    keep_layers: int = 25,
    fmt: str = "auto",
    num_heads: int | None = None,
    dtype: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> MusicgenFeatures:
    """Builds a :class:`MusicgenFeatures` holding the source's first ``keep_layers`` blocks.

    ``source`` is an HF directory, a checkpoint file or an in-memory state dict; ``hf_config`` (or
    the directory's config.json) gives the sizes, otherwise they are read off the tensors and the
    head count comes from audiocraft's ``xp.cfg`` or ``num_heads`` (none of them: an error).
    ``dtype`` None keeps the source's floating dtype.
    """
    if fmt not in ("auto", "hf", "audiocraft"):
        raise CheckpointError(f"unknown source format {fmt!r} (auto, hf or audiocraft)")
    name = "state dict" if isinstance(source, Mapping) else str(source)
    tensors, xp_cfg = read_checkpoint(source, subkey="best_state")
    fmt = detect_format(tensors) if fmt == "auto" else fmt
    if hf_config is None and not isinstance(source, Mapping) and Path(source).is_dir():
        hf_config = read_hf_config(source)
    dtype = dtype or source_dtype(tensors, fmt)
    if fmt == "hf" and hf_config is not None:
        cfg = config_from_hf(hf_config, keep_layers=keep_layers, dtype=dtype, source=name)
        if num_heads is not None and num_heads != cfg.num_attention_heads:
            raise CheckpointError(
                f"{name}: --num-heads {num_heads} contradicts config.json's "
                f"num_attention_heads {cfg.num_attention_heads}"
            )
    else:
        if fmt == "audiocraft" and xp_cfg is not None:
            num_heads = _xp_heads(xp_cfg, num_heads, source=name)
        cfg = config_from_tensors(
            tensors, fmt, keep_layers=keep_layers, num_heads=num_heads, dtype=dtype, source=name
        )
    values = (hf_to_flax if fmt == "hf" else audiocraft_to_flax)(tensors, cfg, source=name)
    model = nnx.eval_shape(lambda: MusicgenFeatures(cfg, rngs=nnx.Rngs(0)))
    fill(model, values, source=name)
    return model


def source_dtype(tensors: Mapping[str, np.ndarray], fmt: str) -> str:
    """The model dtype that keeps the source's: that of its first codebook table."""
    prefix = hf_prefix(tensors) or ""
    key = "emb.0.weight" if fmt == "audiocraft" else f"{prefix}embed_tokens.0.weight"
    found = np.dtype(tensors[key].dtype).name if key in tensors else "float32"
    return found if found in DTYPES else "float32"


def _xp_heads(xp_cfg: Any, num_heads: int | None, *, source: str) -> int | None:
    """The head count of audiocraft's ``xp.cfg`` (``transformer_lm.num_heads``), checked against
    ``num_heads`` when both are given; None when the file holds none."""
    try:
        root = yaml.safe_load(xp_cfg) if isinstance(xp_cfg, str) else xp_cfg
    except yaml.YAMLError:
        return num_heads
    lm = root.get("transformer_lm") if isinstance(root, Mapping) else None
    heads = lm.get("num_heads") if isinstance(lm, Mapping) else None
    if not isinstance(heads, int):
        return num_heads
    if num_heads is not None and num_heads != heads:
        raise CheckpointError(
            f"{source}: --num-heads {num_heads} contradicts xp.cfg's transformer_lm.num_heads "
            f"{heads}"
        )
    return heads


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m convert.musicgen", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="HF directory, .safetensors/.bin/.pt file (HF or audiocraft)")
    parser.add_argument("out", help="output bossa-jax checkpoint directory")
    parser.add_argument("--keep-layers", type=int, default=25, help="blocks to keep (SPEC 1.3: 25)")
    parser.add_argument("--format", choices=("auto", "hf", "audiocraft"), default="auto")
    parser.add_argument(
        "--num-heads", type=int, default=None, help="head count when no config.json/xp.cfg has it"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="default: the source's"
    )
    add_output_options(parser)
    args = parser.parse_args(argv)
    check_output(
        args.out, CHECKPOINT_KIND, folder=True, overwrite=args.overwrite, sources=[args.src]
    )
    model = convert_musicgen(
        args.src,
        keep_layers=args.keep_layers,
        fmt=args.format,
        num_heads=args.num_heads,
        dtype=args.dtype,
    )
    save_musicgen(args.out, model, overwrite=args.overwrite)
    cfg = model.cfg
    print(
        f"wrote {args.out}: MusicGen {cfg.keep_layers}/{cfg.num_hidden_layers} blocks, "
        f"d={cfg.hidden_size}, {cfg.num_attention_heads} heads, ffn {cfg.ffn_dim}, {cfg.dtype}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
