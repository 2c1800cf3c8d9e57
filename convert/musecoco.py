"""MuseCoco-xLarge (HF port) -> bossa-jax ``MuseCoco`` checkpoint (SPEC 4.4, 4.5; DESIGN
"Converters").

Source layout: ``shared/reference/musecoco-1b/state_dict_keys.json`` (``MuseCocoLMHeadModel``):
``decoder.embed_tokens.weight``, per layer ``decoder.layers.N.self_attn.{q,k,v,out}_proj.*``,
``self_attn_layer_norm.*``, ``fc1.*``, ``fc2.*``, ``final_layer_norm.*``, then
``decoder.layer_norm.*`` and ``lm_head.weight``. ``decoder.embed_positions._float_tensor``
(fairseq's dtype buffer) is ignored: positions are computed, not stored. The stage-2 LoRA matrices
``decoder.layers.N.self_attn.lora_{q,k,v}.lora_{A,B}`` are converted when present (``--prefix
musecoco.`` reads MuseCoco out of a stage-2 file); without them the model is built without LoRA.

Sources are read one tensor at a time through ``convert.common.load_state_dict`` (a ``.safetensors``
file or an HF directory through ``safe_open``, a ``.pt``/``.bin`` through ``torch.load(mmap=True,
weights_only=True)`` with the project's pickle allowlist). Each stacked parameter is allocated once
in its final dtype and filled layer by layer, so the peak host memory stays near one copy of the
checkpoint. The source dtype is kept unless ``--dtype`` asks for another. Sizes come from
``config.json`` (a directory's, or ``--config``) or from the tensors; the head count is not in the
tensors, so without a config it must be given (``--num-heads``), never guessed. Missing and
unexpected keys are reported together in one line; every tensor's shape is checked against the model
by its source name.

The original fairseq checkpoint of the MuseCoco release (``linear_mask-1billion``, microsoft/muzic
``musecoco/2-attribute2music_model/linear_mask/linear/transformer_lm.py``: a
``LinearTransformerLanguageModel`` whose ``LinearTransformerDecoder`` (``transformer.py``) holds
``embed_tokens``, ``embed_positions``, ``layers`` (``transformer_layer.py``: fairseq's
``TransformerDecoderLayer`` with a linear ``AttentionLayer`` as ``self_attn``), ``layer_norm``,
``output_projection`` and a ``version`` buffer) is read too: a fairseq checkpoint dict (``model``
beside ``args`` or ``cfg``; the optimizer state and meters beside them are never read) loaded with
``torch.load(weights_only=True)`` and the allowlist of ``convert.common`` (``argparse.Namespace``,
numpy scalars), each tensor memory-mapped and read once. Its names are the HF port's but for
:data:`FAIRSEQ_RENAMED` (``decoder.output_projection.weight`` -> ``lm_head.weight``) and the
ignored ``decoder.version``: the HF port's own conversion script does exactly this before a strict
``load_state_dict`` (in the public repository johBac97/mirex2025-musecoco, the MuseCoco HF port
BOSSA uses, under ``transformers/src/transformers/models/musecoco/``:
``convert_original_model/convert_musecoco_original_pytorch_checkpoint_to_pytorch.py``, and the
fairseq-side ``linear_transformer/attention_layer.py`` with ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``). Sizes come from ``args``
(``decoder_embed_dim``, ``decoder_attention_heads``, ``decoder_layers``,
``decoder_ffn_embed_dim``, ``dropout``; checked against the tensors); an ``args`` value that
selects another architecture than the one this port computes (:data:`FAIRSEQ_REQUIRED`) is an
error naming it.

Command: ``python -m convert.musecoco SRC OUT [--config config.json] [--num-heads 24]
[--prefix musecoco.] [--dtype keep|float32|bfloat16]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from bossa_jax.cli import ArgumentParser, add_output_options
from bossa_jax.config import MuseCocoConfig
from bossa_jax.errors import CheckpointError, ConfigError, run_cli
from bossa_jax.models.musecoco import CHECKPOINT_KIND, MuseCoco, load_musecoco, save_musecoco
from bossa_jax.outputs import check_output
from convert.common import (
    LazyTensors,
    _first_eight,
    _torch_load,
    aligned_empty,
    fairseq_parts,
    fill,
    load_state_dict,
    param_paths,
)

__all__ = ["convert_musecoco", "load_musecoco", "save_musecoco", "to_hf_state_dict"]

IGNORED = ("decoder.embed_positions._float_tensor",)
LAYER = "decoder.layers.{i}."
# (Flax path, HF-port name, is a kernel (transpose))
TOP_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("embed_tokens.embedding", "decoder.embed_tokens.weight", False),
    ("layer_norm.scale", "decoder.layer_norm.weight", False),
    ("layer_norm.bias", "decoder.layer_norm.bias", False),
    ("lm_head.kernel", "lm_head.weight", True),
)
BLOCK_TABLE: tuple[tuple[str, str, bool], ...] = (
    *(
        (f"self_attn.{p}_proj.{flax}", f"self_attn.{p}_proj.{hf}", flax == "kernel")
        for p in ("q", "k", "v", "out")
        for flax, hf in (("kernel", "weight"), ("bias", "bias"))
    ),
    ("self_attn_layer_norm.scale", "self_attn_layer_norm.weight", False),
    ("self_attn_layer_norm.bias", "self_attn_layer_norm.bias", False),
    ("mlp.fc1.kernel", "fc1.weight", True),
    ("mlp.fc1.bias", "fc1.bias", False),
    ("mlp.fc2.kernel", "fc2.weight", True),
    ("mlp.fc2.bias", "fc2.bias", False),
    ("final_layer_norm.scale", "final_layer_norm.weight", False),
    ("final_layer_norm.bias", "final_layer_norm.bias", False),
)
# Flax a (in, r) = lora_A^T, b (r, out) = lora_B^T
LORA_TABLE: tuple[tuple[str, str, bool], ...] = tuple(
    (f"self_attn.{p}_proj.lora.{flax}", f"self_attn.lora_{p}.lora_{hf}", True)
    for p in ("q", "k", "v")
    for flax, hf in (("a", "A"), ("b", "B"))
)
# the original fairseq checkpoint (see the module docstring): its names -> the HF port's
FAIRSEQ_RENAMED = {"decoder.output_projection.weight": "lm_head.weight"}
FAIRSEQ_IGNORED = ("decoder.version",)
# fairseq args that, set otherwise, select another network than MuseCoco's (and this port's):
# learned or no positions, unscaled embeddings, an embedding LayerNorm, another activation
FAIRSEQ_REQUIRED: dict[str, Any] = {
    "activation_fn": "gelu",
    "no_scale_embedding": False,
    "decoder_learned_pos": False,
    "no_token_positional_embeddings": False,
    "layernorm_embedding": False,
    "adaptive_input": False,
    "adaptive_softmax_cutoff": None,
    "no_decoder_final_norm": False,
}
# LinearTransformerDecoder builds its sinusoidal table for 8192 positions whatever the args say
FAIRSEQ_POSITIONS = 8192
DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
}


# ---------------------------------------------------------------------------------------------
# Config


def _layer_count(keys: Sequence[str]) -> int:
    regex = re.compile(r"decoder\.layers\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def config_from_source(
    src: LazyTensors,
    hf_config: Mapping[str, Any] | None,
    *,
    num_heads: int | None,
    dtype: str | None,
) -> MuseCocoConfig:
    """Sizes from ``hf_config`` (the HF port's config.json) where given, else from the tensors;
    the head count from ``hf_config`` or ``num_heads`` (an error without either)."""
    vocab, hidden = src.shape("decoder.embed_tokens.weight")
    inner = src.shape("decoder.layers.0.self_attn.q_proj.weight")[0]
    lora_key = "decoder.layers.0.self_attn.lora_q.lora_A"
    heads = num_heads
    fields: dict[str, Any] = {}
    if hf_config is not None:
        try:
            heads = int(hf_config["n_head"]) if heads is None else heads
            fields = dict(
                max_positions=int(hf_config.get("n_positions", 8192)),
                dropout=float(hf_config.get("dropout", 0.1)),
                layer_norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
            )
            if int(hf_config["n_embd"]) != hidden or int(hf_config["vocab_size"]) != vocab:
                raise CheckpointError(
                    f"{src.name}: config.json says n_embd {hf_config['n_embd']}, vocab_size "
                    f"{hf_config['vocab_size']}; the tensors are {vocab} x {hidden}"
                )
        except KeyError as err:
            raise CheckpointError(f"{src.name}: config.json has no key {err}") from err
    if heads is None:
        raise CheckpointError(
            f"{src.name}: the head count is not in the tensors; give --num-heads (MuseCoco-xLarge: "
            "24) or --config config.json"
        )
    if heads <= 0 or heads * (hidden // heads) != inner:
        raise CheckpointError(
            f"{src.name}: {heads} heads on width {hidden} do not give the "
            f"{inner} rows of 'decoder.layers.0.self_attn.q_proj.weight' (heads x width // heads)"
        )
    source_dtype = np.dtype(src["decoder.layer_norm.weight"].dtype)
    if dtype is None and source_dtype not in DTYPE_NAMES:
        raise CheckpointError(f"{src.name}: unsupported parameter dtype {source_dtype}")
    cfg = MuseCocoConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=_layer_count(src.keys()),
        ffn_dim=src.shape("decoder.layers.0.fc1.weight")[0],
        lora=lora_key in src,
        lora_rank=src.shape(lora_key)[0] if lora_key in src else MuseCocoConfig.lora_rank,
        dtype=dtype or DTYPE_NAMES[source_dtype],
        **fields,
    )
    try:
        cfg.validate("musecoco")
    except ConfigError as err:
        raise CheckpointError(f"{src.name}: {err}") from err
    return cfg


# ---------------------------------------------------------------------------------------------
# Conversion


def source_keys(cfg: MuseCocoConfig) -> list[str]:
    """Every source key the model needs, in checkpoint order."""
    keys = [TOP_TABLE[0][1]]
    table = BLOCK_TABLE + (LORA_TABLE if cfg.lora else ())
    for i in range(cfg.num_hidden_layers):
        keys += [LAYER.format(i=i) + hf for _, hf, _ in table]
    return keys + [hf for _, hf, _ in TOP_TABLE[1:]]


def check_key_sets(src: LazyTensors, needed: Sequence[str]) -> None:
    """One line naming the missing and the unexpected keys, before any tensor is read."""
    have = set(src.keys())
    missing = [k for k in needed if k not in have]
    unexpected = sorted(have - set(needed) - set(IGNORED))
    problems = [f"missing keys {_first_eight(missing)}"] if missing else []
    problems += [f"unexpected keys {_first_eight(unexpected)}"] if unexpected else []
    if problems:
        raise CheckpointError(f"{src.name}: " + "; ".join(problems))


def _checked(src: LazyTensors, key: str, want: tuple[int, ...], kernel: bool) -> np.ndarray:
    """One source tensor in Flax orientation; a wrong shape names the source key."""
    want_source = want[::-1] if kernel else want
    if src.shape(key) != want_source:
        raise CheckpointError(
            f"{src.name}: shape mismatch for '{key}': expected {want_source}, "
            f"found {src.shape(key)}"
        )
    value = src[key]
    return value.T if kernel else value


def source_to_flax(src: LazyTensors, model: MuseCoco) -> dict[str, np.ndarray]:
    """The values of ``model``'s parameters (Flax dotted paths) from ``src``, in their dtypes."""
    cfg = model.cfg
    check_key_sets(src, source_keys(cfg))
    params = param_paths(model)
    out: dict[str, np.ndarray] = {}
    for flax, hf, kernel in TOP_TABLE:
        var = params[flax]
        out[flax] = aligned_empty(var.shape, var.dtype)  # aligned: device_put aliases it
        out[flax][...] = _checked(src, hf, tuple(var.shape), kernel)
    for flax, hf, kernel in BLOCK_TABLE + (LORA_TABLE if cfg.lora else ()):
        var = params[f"layers.{flax}"]
        stacked = aligned_empty(var.shape, var.dtype)  # filled layer by layer: no second copy
        for i in range(cfg.num_hidden_layers):
            stacked[i] = _checked(src, LAYER.format(i=i) + hf, tuple(var.shape[1:]), kernel)
        out[f"layers.{flax}"] = stacked
    return out


def fairseq_names(src: LazyTensors) -> LazyTensors:
    """A fairseq MuseCoco state dict under the HF port's names (nothing read)."""
    names = {FAIRSEQ_RENAMED.get(k, k): k for k in src if k not in FAIRSEQ_IGNORED}
    for old, new in FAIRSEQ_RENAMED.items():
        if old in src and new in src:
            raise CheckpointError(f"{src.name}: both '{old}' and '{new}' present")
    return src.view(names)


def fairseq_config(src: LazyTensors, args: Mapping[str, Any]) -> dict[str, Any]:
    """The HF-port config (``config_from_source``'s keys) a fairseq checkpoint's ``args``
    describe; values that contradict the tensors or select another network name the arg."""
    for name, want in FAIRSEQ_REQUIRED.items():
        if args.get(name, want) != want:
            raise CheckpointError(
                f"{src.name}: args.{name} = {args[name]!r}; MuseCoco (and this converter) "
                f"needs {want!r}"
            )
    heads = args.get("decoder_attention_heads")
    if not isinstance(heads, int) or isinstance(heads, bool):
        raise CheckpointError(f"{src.name}: args.decoder_attention_heads missing or not an integer")
    implied = {
        "decoder_embed_dim": src.shape("decoder.embed_tokens.weight")[1],
        "decoder_layers": _layer_count(src.keys()),
        "decoder_ffn_embed_dim": src.shape("decoder.layers.0.fc1.weight")[0],
    }
    for name, value in implied.items():
        if name in args and args[name] != value:
            raise CheckpointError(
                f"{src.name}: args.{name} = {args[name]} but the weights imply {value}"
            )
    return {
        "n_head": heads,
        "n_embd": implied["decoder_embed_dim"],
        "vocab_size": src.shape("decoder.embed_tokens.weight")[0],
        "n_positions": FAIRSEQ_POSITIONS,
        "dropout": float(args.get("dropout", 0.1)),
    }


def read_source(
    source: str | Path | Mapping[str, Any], prefix: str = ""
) -> tuple[LazyTensors, dict[str, Any] | None]:
    """(the tensors under the HF port's names, the fairseq args when ``source`` is the original
    fairseq checkpoint, else None); a pickle is unpickled once."""
    name = "state dict" if isinstance(source, Mapping) else str(source)
    obj: Any = source
    if not isinstance(source, Mapping):
        path = Path(source)
        pickled = path.is_file() and path.suffix != ".safetensors" and path.stat().st_size > 0
        if not pickled:
            return load_state_dict(path, subkey="model", prefix=prefix), None
        obj = _torch_load(path)
    parts = fairseq_parts(obj, name)
    if parts is not None:
        tensors, args = parts
        return fairseq_names(tensors).under(prefix), args
    tensors = load_state_dict(obj, subkey="model")  # a plain (or fairseq-wrapped) state dict
    tensors.name = name
    return tensors.under(prefix), None


def convert_musecoco(
    source: str | Path | Mapping[str, Any],
    *,
    hf_config: Mapping[str, Any] | str | Path | None = None,
    num_heads: int | None = None,
    prefix: str = "",
    dtype: str | None = None,
) -> MuseCoco:
    """A :class:`MuseCoco` holding ``source``'s weights (see the module docstring)."""
    src, fairseq_args = read_source(source, prefix)
    if hf_config is None and fairseq_args is not None:
        hf_config = fairseq_config(src, fairseq_args)
    if hf_config is None and not isinstance(source, Mapping) and Path(source).is_dir():
        if (Path(source) / "config.json").is_file():
            hf_config = Path(source) / "config.json"
    if isinstance(hf_config, (str, Path)):
        try:
            hf_config = json.loads(Path(hf_config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{hf_config}: not a readable config.json ({err})") from err
    cfg = config_from_source(src, hf_config, num_heads=num_heads, dtype=dtype)
    model = nnx.eval_shape(lambda: MuseCoco(cfg, rngs=nnx.Rngs(0)))
    fill(model, source_to_flax(src, model), source=src.name)
    # jax arrays for the checkpoint writer: on CPU, device_put aliases the page-aligned buffers of
    # source_to_flax instead of copying them (an unaligned buffer is copied), and orbax then writes
    # them without a second host copy of the model; waiting on each keeps one transfer in flight.
    for var in param_paths(model).values():
        var.set_value(jax.block_until_ready(jax.device_put(var.get_value())))
    return model


def to_hf_state_dict(model: MuseCoco) -> dict[str, np.ndarray]:
    """The model in the HF-port layout (its own dtypes; LoRA keys when it has adapters)."""
    cfg = model.cfg
    params = {name: np.asarray(var[...]) for name, var in param_paths(model).items()}
    out: dict[str, np.ndarray] = {}
    for flax, hf, kernel in TOP_TABLE:
        out[hf] = np.ascontiguousarray(params[flax].T if kernel else params[flax])
    for flax, hf, kernel in BLOCK_TABLE + (LORA_TABLE if cfg.lora else ()):
        for i, value in enumerate(params[f"layers.{flax}"]):
            out[LAYER.format(i=i) + hf] = np.ascontiguousarray(value.T if kernel else value)
    return out


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m convert.musecoco", description=__doc__.split("\n")[0])
    parser.add_argument(
        "src", help="HF directory, .safetensors, .pt/.bin state dict or the fairseq checkpoint"
    )
    parser.add_argument("out", help="output bossa-jax checkpoint directory")
    parser.add_argument("--config", default=None, help="the HF port's config.json")
    parser.add_argument("--num-heads", type=int, default=None, help="without a config.json")
    parser.add_argument("--prefix", default="", help="key prefix to read under (musecoco.)")
    parser.add_argument("--dtype", choices=("keep", "float32", "bfloat16"), default="keep")
    add_output_options(parser)
    args = parser.parse_args(argv)
    sources = [args.src, *([args.config] if args.config else [])]
    check_output(args.out, CHECKPOINT_KIND, folder=True, overwrite=args.overwrite, sources=sources)
    model = convert_musecoco(
        args.src,
        hf_config=args.config,
        num_heads=args.num_heads,
        prefix=args.prefix,
        dtype=None if args.dtype == "keep" else args.dtype,
    )
    save_musecoco(args.out, model, overwrite=args.overwrite)
    cfg = model.cfg
    print(
        f"wrote {args.out}: MuseCoco {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads of {cfg.head_dim}, ffn {cfg.ffn_dim}, "
        f"LoRA {'r' + str(cfg.lora_rank) if cfg.lora else 'none'}, {cfg.dtype}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
