"""EnCodec-32kHz converter: HF ``EncodecModel`` or audiocraft compression model -> bossa-jax encoder
(SPEC 1.1; DESIGN "Converters").

Usage: ``python -m convert.encodec SRC OUT [--format auto|hf|audiocraft] [--debug]``

Sources:

* HF: a directory (config.json + safetensors/bin) or a state dict / file with keys
  ``encoder.layers.N...`` and ``quantizer.layers.K.codebook.embed``. Weight norm may be stored as
  ``parametrizations.weight.original0/original1`` (torch >= 2.1 ``save_pretrained``) or as the
  legacy ``weight_g``/``weight_v`` (the Hub files); plain ``weight`` is accepted too.
* audiocraft: a compression checkpoint (``{"best_state": ..., "xp.cfg": yaml}``) or a state dict
  with keys ``encoder.model.N.conv.conv.weight_g``, ``encoder.model.N.lstm.weight_ih_l0``,
  ``quantizer.vq.layers.K._codebook.embed``.

Weight norm is folded (``w = g * v / ||v||``, norm per output channel); kernels are transposed
to (kernel, in, out); the LSTM's two biases are summed. Decoder keys and the codebooks' training
buffers are ignored; any other unused key is reported by name. Sizes come from config.json
(HF directory), ``xp.cfg`` (audiocraft checkpoint) or, failing both, from the tensor shapes (with
the EnCodec-32kHz values for what shapes cannot tell: 32 kHz, non-causal, reflect padding).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from bossa_jax.checkpoint import save_module
from bossa_jax.cli import ArgumentParser, add_output_options
from bossa_jax.config import EncodecConfig
from bossa_jax.errors import BossaError, CheckpointError, run_cli
from bossa_jax.models.encodec import EncodecEncoder, config_section, load_encodec
from bossa_jax.outputs import check_output
from convert.common import (
    TensorReader,
    fill,
    param_paths,
    read_checkpoint,
    read_hf_config,
)

__all__ = [
    "config_from_audiocraft",
    "config_from_hf",
    "config_from_tensors",
    "convert_encodec",
    "detect_format",
    "load_encodec",
    "to_hf_state_dict",
]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where one source format keeps each module of the encoder and quantiser."""

    encoder: str  # prefix of the encoder's sequential list
    conv: str  # suffix from a list entry to its torch Conv1d
    codebook: str  # the k-th codebook tensor

    def layer(self, index: int) -> str:
        return f"{self.encoder}.{index}"


LAYOUTS = {
    "hf": _Layout("encoder.layers", "conv", "quantizer.layers.{k}.codebook.embed"),
    "audiocraft": _Layout("encoder.model", "conv.conv", "quantizer.vq.layers.{k}._codebook.embed"),
}
IGNORE_PREFIXES = ("decoder.",)
# codebook training state (EMA statistics), not used to encode
IGNORE_SUFFIXES = (".inited", ".cluster_size", ".embed_avg")

# HF EncodecConfig defaults, for keys a config.json leaves out
HF_DEFAULTS: dict[str, Any] = {
    "target_bandwidths": [1.5, 3.0, 6.0, 12.0, 24.0],
    "sampling_rate": 24000,
    "audio_channels": 1,
    "normalize": False,
    "chunk_length_s": None,
    "hidden_size": 128,
    "num_filters": 32,
    "num_residual_layers": 1,
    "upsampling_ratios": [8, 5, 4, 2],
    "norm_type": "weight_norm",
    "kernel_size": 7,
    "last_kernel_size": 7,
    "residual_kernel_size": 3,
    "dilation_growth_rate": 2,
    "use_causal_conv": True,
    "pad_mode": "reflect",
    "compress": 2,
    "num_lstm_layers": 2,
    "codebook_size": 1024,
    "codebook_dim": None,
    "use_conv_shortcut": True,
}


def detect_format(tensors: Mapping[str, np.ndarray], *, source: str) -> str:
    if any(k.startswith("encoder.layers.") for k in tensors):
        return "hf"
    if any(k.startswith("encoder.model.") for k in tensors):
        return "audiocraft"
    raise CheckpointError(
        f"{source}: not an EnCodec checkpoint (no 'encoder.layers.*' (HF) or 'encoder.model.*' "
        "(audiocraft) keys)"
    )


# ---------------------------------------------------------------------------------------------
# Configs


def _make_config(source: str, where: str, **fields: Any) -> EncodecConfig:
    try:
        cfg = EncodecConfig(**fields)
        cfg.validate("encodec")
    except BossaError as err:
        raise CheckpointError(
            f"{source}: {where} describes an unsupported EnCodec ({err})"
        ) from err
    return cfg


def num_codebooks_for_bandwidth(
    bandwidth: float, codebook_size: int, sampling_rate: int, hop: int
) -> int:
    """HF ``get_num_quantizers_for_bandwidth``: 2.2 kbps at 50 Hz x 11 bits -> 4 codebooks."""
    frame_rate = math.ceil(sampling_rate / hop)
    return int(max(1, math.floor(bandwidth * 1000 / (math.log2(codebook_size) * frame_rate))))


def config_from_hf(hf: Mapping[str, Any], *, source: str) -> EncodecConfig:
    """EncodecConfig from an HF config.json; the codebook count is the one ``encode()`` uses by
    default (the first target bandwidth)."""
    c = {**HF_DEFAULTS, **hf}
    where = "config.json"
    if c["norm_type"] != "weight_norm":
        raise CheckpointError(
            f"{source}: {where} norm_type={c['norm_type']!r} is not supported (weight_norm only)"
        )
    if c["normalize"]:
        raise CheckpointError(
            f"{source}: {where} normalize=true is not supported (EnCodec-32kHz has it off)"
        )
    if c["chunk_length_s"] is not None:
        raise CheckpointError(
            f"{source}: {where} chunk_length_s={c['chunk_length_s']} is not supported "
            "(EnCodec-32kHz encodes whole clips)"
        )
    ratios = tuple(int(r) for r in c["upsampling_ratios"])
    bandwidths = list(c["target_bandwidths"])
    if not bandwidths:
        raise CheckpointError(f"{source}: {where} has no target_bandwidths")
    return _make_config(
        source,
        where,
        sampling_rate=int(c["sampling_rate"]),
        audio_channels=int(c["audio_channels"]),
        num_filters=int(c["num_filters"]),
        upsampling_ratios=ratios,
        hidden_size=int(c["hidden_size"]),
        num_lstm_layers=int(c["num_lstm_layers"]),
        kernel_size=int(c["kernel_size"]),
        last_kernel_size=int(c["last_kernel_size"]),
        residual_kernel_size=int(c["residual_kernel_size"]),
        num_residual_layers=int(c["num_residual_layers"]),
        dilation_growth_rate=int(c["dilation_growth_rate"]),
        compress=int(c["compress"]),
        use_causal_conv=bool(c["use_causal_conv"]),
        pad_mode=str(c["pad_mode"]),
        use_conv_shortcut=bool(c["use_conv_shortcut"]),
        codebook_size=int(c["codebook_size"]),
        codebook_dim=int(c["codebook_dim"] or c["hidden_size"]),
        num_codebooks=num_codebooks_for_bandwidth(
            float(bandwidths[0]),
            int(c["codebook_size"]),
            int(c["sampling_rate"]),
            math.prod(ratios),
        ),
    )


_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _resolve(value: Any, root: Mapping[str, Any]) -> Any:
    """Resolves OmegaConf's ``${a.b}`` references (xp.cfg is saved unresolved)."""
    for _ in range(8):
        match = _INTERPOLATION.match(value) if isinstance(value, str) else None
        if not match:
            return value
        node: Any = root
        for part in match.group(1).split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        value = node
    return value


def config_from_audiocraft(xp_cfg: str | Mapping[str, Any], *, source: str) -> EncodecConfig:
    """EncodecConfig from an audiocraft experiment config (``xp.cfg``: seanet, rvq sections)."""
    where = "xp.cfg"
    try:
        root = yaml.safe_load(xp_cfg) if isinstance(xp_cfg, str) else dict(xp_cfg)
    except yaml.YAMLError as err:
        raise CheckpointError(f"{source}: {where} is not valid YAML ({err})") from err
    if not isinstance(root, Mapping) or not all(
        isinstance(root.get(s), Mapping) for s in ("seanet", "rvq")
    ):
        raise CheckpointError(f"{source}: {where} lacks the 'seanet' and 'rvq' sections")
    seanet = {k: v for k, v in root["seanet"].items() if k not in ("encoder", "decoder")}
    seanet.update(root["seanet"].get("encoder") or {})

    def get(section: Mapping[str, Any], key: str, default: Any) -> Any:
        return _resolve(section.get(key, default), root)

    encodec = root.get("encodec") or {}
    if get(encodec, "renormalize", False):
        raise CheckpointError(f"{source}: {where} encodec.renormalize=true is not supported")
    activation = get(seanet, "activation", "ELU")
    alpha = (get(seanet, "activation_params", {}) or {}).get("alpha", 1.0)
    if activation != "ELU" or float(alpha) != 1.0:
        raise CheckpointError(f"{source}: {where} seanet activation must be ELU(alpha=1)")
    if get(seanet, "norm", "weight_norm") not in ("weight_norm", "none"):
        raise CheckpointError(
            f"{source}: {where} seanet.norm={get(seanet, 'norm', '')!r} is not supported"
        )
    dimension = int(get(seanet, "dimension", 128))
    return _make_config(
        source,
        where,
        sampling_rate=int(_resolve(root.get("sample_rate", 32000), root)),
        audio_channels=int(get(seanet, "channels", 1)),
        num_filters=int(get(seanet, "n_filters", 32)),
        upsampling_ratios=tuple(int(r) for r in get(seanet, "ratios", [8, 5, 4, 2])),
        hidden_size=dimension,
        num_lstm_layers=int(get(seanet, "lstm", 0)),
        kernel_size=int(get(seanet, "kernel_size", 7)),
        last_kernel_size=int(get(seanet, "last_kernel_size", 7)),
        residual_kernel_size=int(get(seanet, "residual_kernel_size", 3)),
        num_residual_layers=int(get(seanet, "n_residual_layers", 3)),
        dilation_growth_rate=int(get(seanet, "dilation_base", 2)),
        compress=int(get(seanet, "compress", 2)),
        use_causal_conv=bool(get(seanet, "causal", False)),
        pad_mode=str(get(seanet, "pad_mode", "reflect")),
        use_conv_shortcut=not bool(get(seanet, "true_skip", True)),
        codebook_size=int(get(root["rvq"], "bins", 1024)),
        codebook_dim=dimension,
        num_codebooks=int(get(root["rvq"], "n_q", 8)),
    )


def _conv_shape(tensors: Mapping[str, np.ndarray], module: str) -> tuple[int, ...] | None:
    for suffix in ("weight", "parametrizations.weight.original1", "weight_v"):
        if f"{module}.{suffix}" in tensors:
            return tuple(tensors[f"{module}.{suffix}"].shape)
    return None


def config_from_tensors(
    tensors: Mapping[str, np.ndarray], fmt: str, *, source: str, base: EncodecConfig | None = None
) -> EncodecConfig:
    """Reads the architecture off the tensor shapes; ``base`` (default: EnCodec-32kHz) supplies
    what shapes cannot tell (sampling rate, causality, padding mode, dilation growth)."""
    base = base or EncodecConfig()
    layout = LAYOUTS[fmt]
    kinds: dict[int, str] = {}
    pattern = re.compile(re.escape(layout.encoder) + r"\.(\d+)\.(\w+)")
    for key in tensors:
        match = pattern.match(key)
        if match:
            index, child = int(match.group(1)), match.group(2)
            kind = {"block": "res", "shortcut": "res", "lstm": "lstm"}.get(child, "conv")
            kinds[index] = kind
    order = [kinds[i] for i in sorted(kinds)]
    indices = sorted(kinds)
    if not order or order[0] != "conv" or "lstm" not in order or order[-1] != "conv":
        raise CheckpointError(f"{source}: cannot read the encoder layout from its keys")

    def conv(index: int, sub: str = "") -> tuple[int, ...]:
        module = f"{layout.layer(index)}{sub}.{layout.conv}"
        shape = _conv_shape(tensors, module)
        if shape is None or len(shape) != 3:
            raise CheckpointError(f"{source}: no 3-d convolution weight under '{module}'")
        return shape

    first = conv(indices[0])
    lstm_pos = order.index("lstm")
    ratios, res_counts, res_first, count = [], [], None, 0
    for index, kind in zip(indices[1:lstm_pos], order[1:lstm_pos]):
        if kind == "res":
            count += 1
            res_first = res_first or index
        else:  # the stage's downsampling conv: kernel 2 x ratio
            ratios.append(conv(index)[2] // 2)
            res_counts.append(count)
            count = 0
    if not ratios or len(set(res_counts)) > 1:
        raise CheckpointError(f"{source}: cannot read the encoder stages from its keys")
    lstm_prefix = f"{layout.layer(indices[lstm_pos])}.lstm"
    num_lstm = sum(
        1 for k in tensors if re.fullmatch(re.escape(lstm_prefix) + r"\.weight_ih_l\d+", k)
    )
    last = conv(indices[-1])
    res_kernel, compress, shortcut = base.residual_kernel_size, base.compress, False
    if res_first is not None:
        block = conv(res_first, ".block.1")
        res_kernel, compress = block[2], block[1] // block[0]
        module = f"{layout.layer(res_first)}.shortcut.{layout.conv}"
        shortcut = _conv_shape(tensors, module) is not None
    codebooks = []
    while layout.codebook.format(k=len(codebooks)) in tensors:
        codebooks.append(tensors[layout.codebook.format(k=len(codebooks))].shape)
    if not codebooks:
        raise CheckpointError(f"{source}: missing key '{layout.codebook.format(k=0)}'")
    return _make_config(
        source,
        "the tensor shapes",
        sampling_rate=base.sampling_rate,
        audio_channels=first[1],
        num_filters=first[0],
        upsampling_ratios=tuple(reversed(ratios)),
        hidden_size=last[0],
        num_lstm_layers=num_lstm,
        kernel_size=first[2],
        last_kernel_size=last[2],
        residual_kernel_size=res_kernel,
        num_residual_layers=res_counts[0] if res_counts else 0,
        dilation_growth_rate=base.dilation_growth_rate,
        compress=compress,
        use_causal_conv=base.use_causal_conv,
        pad_mode=base.pad_mode,
        use_conv_shortcut=shortcut,
        codebook_size=codebooks[0][0],
        codebook_dim=codebooks[0][1],
        num_codebooks=len(codebooks),
    )


# ---------------------------------------------------------------------------------------------
# The name table: source module per Flax module, in the encoder's sequential order


def _module_table(cfg: EncodecConfig, layout: _Layout) -> dict[str, str]:
    """Flax module path -> source module (a torch Conv1d or LSTM) prefix."""
    table = {"conv_in": f"{layout.layer(0)}.{layout.conv}"}
    index = 1
    for s in range(len(cfg.upsampling_ratios)):
        for j in range(cfg.num_residual_layers):
            block = layout.layer(index + j)
            table[f"stages.{s}.res_blocks.{j}.conv1"] = f"{block}.block.1.{layout.conv}"
            table[f"stages.{s}.res_blocks.{j}.conv2"] = f"{block}.block.3.{layout.conv}"
            if cfg.use_conv_shortcut:
                table[f"stages.{s}.res_blocks.{j}.shortcut"] = f"{block}.shortcut.{layout.conv}"
        index += cfg.num_residual_layers  # then an ELU
        table[f"stages.{s}.down"] = f"{layout.layer(index + 1)}.{layout.conv}"
        index += 2
    table["lstm"] = f"{layout.layer(index)}.lstm"  # then an ELU
    table["conv_out"] = f"{layout.layer(index + 2)}.{layout.conv}"
    return table


def _expect(value: np.ndarray, shape: tuple[int, ...], key: str, source: str) -> np.ndarray:
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(
            f"{source}: shape mismatch for '{key}': expected {tuple(shape)}, found "
            f"{tuple(value.shape)}"
        )
    return np.asarray(value, np.float32)


def _conv_weight(read: TensorReader, module: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The effective torch weight (out, in, k): plain, or weight norm folded (norm over in, k)."""
    if f"{module}.weight" in read:
        return _expect(read(f"{module}.weight"), shape, f"{module}.weight", read.source)
    if f"{module}.parametrizations.weight.original0" in read:
        g_key = f"{module}.parametrizations.weight.original0"
        v_key = f"{module}.parametrizations.weight.original1"
    else:
        g_key, v_key = f"{module}.weight_g", f"{module}.weight_v"
    v = _expect(read(v_key), shape, v_key, read.source).astype(np.float64)
    g = _expect(read(g_key), (shape[0], 1, 1), g_key, read.source).astype(np.float64)
    norm = np.sqrt(np.sum(np.square(v), axis=(1, 2), keepdims=True))
    return (g * v / norm).astype(np.float32)


def source_to_flax(
    tensors: Mapping[str, np.ndarray], cfg: EncodecConfig, fmt: str, *, source: str
) -> dict[str, np.ndarray]:
    """Source tensors -> Flax parameter values (dotted path -> array); unused keys are errors."""
    layout = LAYOUTS[fmt]
    read = TensorReader(tensors, source)
    shapes = {k: tuple(v.shape) for k, v in param_paths(_abstract(cfg)).items()}
    values: dict[str, np.ndarray] = {}
    for flax_module, module in _module_table(cfg, layout).items():
        if flax_module == "lstm":
            for n in range(cfg.num_lstm_layers):
                dim4, dim = shapes[f"lstm.{n}.input.kernel"][::-1]
                w_ih = _expect(
                    read(f"{module}.weight_ih_l{n}"),
                    (dim4, dim),
                    f"{module}.weight_ih_l{n}",
                    source,
                )
                w_hh = _expect(
                    read(f"{module}.weight_hh_l{n}"),
                    (dim4, dim),
                    f"{module}.weight_hh_l{n}",
                    source,
                )
                b_ih = _expect(
                    read(f"{module}.bias_ih_l{n}"), (dim4,), f"{module}.bias_ih_l{n}", source
                )
                b_hh = _expect(
                    read(f"{module}.bias_hh_l{n}"), (dim4,), f"{module}.bias_hh_l{n}", source
                )
                values[f"lstm.{n}.input.kernel"] = w_ih.T
                values[f"lstm.{n}.recurrent.kernel"] = w_hh.T
                values[f"lstm.{n}.input.bias"] = b_ih + b_hh
            continue
        k, cin, cout = shapes[f"{flax_module}.kernel"]
        weight = _conv_weight(read, module, (cout, cin, k))
        values[f"{flax_module}.kernel"] = weight.transpose(2, 1, 0)
        values[f"{flax_module}.bias"] = _expect(
            read(f"{module}.bias"), (cout,), f"{module}.bias", source
        )
    size, dim = cfg.codebook_size, cfg.codebook_dim
    values["codebooks"] = np.stack(
        [
            _expect(
                read(layout.codebook.format(k=k)), (size, dim), layout.codebook.format(k=k), source
            )
            for k in range(cfg.num_codebooks)
        ]
    )
    # quantiser layers beyond the bandwidth's codebook count are never used by encode()
    unused_layers = tuple(
        layout.codebook.format(k=k).rsplit(".", 1)[0] + "."
        for k in range(cfg.num_codebooks, cfg.num_codebooks + 64)
    )
    read.check_unused(IGNORE_PREFIXES + unused_layers, IGNORE_SUFFIXES)
    return values


def _abstract(cfg: EncodecConfig) -> EncodecEncoder:
    return nnx.eval_shape(lambda: EncodecEncoder(cfg, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------
# Entry points


def convert_encodec(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    fmt: str = "auto",
    config: EncodecConfig | None = None,
) -> EncodecEncoder:
    """Builds an :class:`EncodecEncoder` from an HF or audiocraft EnCodec checkpoint.

    ``config`` overrides what would be read from config.json / xp.cfg / the tensor shapes.
    """
    if fmt not in ("auto", "hf", "audiocraft"):
        raise CheckpointError(f"unknown source format {fmt!r} (auto, hf or audiocraft)")
    name = "state dict" if isinstance(source, Mapping) else str(source)
    tensors, xp_cfg = read_checkpoint(source, subkey="best_state")
    fmt = detect_format(tensors, source=name) if fmt == "auto" else fmt
    if config is None:
        if fmt == "hf" and not isinstance(source, Mapping) and Path(source).is_dir():
            if (Path(source) / "config.json").is_file():
                config = config_from_hf(read_hf_config(source), source=name)
        elif fmt == "audiocraft" and xp_cfg is not None:
            config = config_from_audiocraft(xp_cfg, source=name)
        if config is None:
            config = config_from_tensors(tensors, fmt, source=name)
    values = source_to_flax(tensors, config, fmt, source=name)
    model = _abstract(config)
    fill(model, values, source=name)
    for var in param_paths(model).values():
        var.set_value(jnp.asarray(var.get_value()))
    return model


def to_hf_state_dict(model: EncodecEncoder, *, legacy: bool = False) -> dict[str, np.ndarray]:
    """The encoder and codebooks in HF ``EncodecModel`` names (no decoder): weight norm as
    ``parametrizations.weight.original0/1`` (``legacy``: ``weight_g/weight_v``) with g = ||w||,
    v = w; the LSTM's summed bias as ``bias_ih`` and a zero ``bias_hh``."""
    cfg = model.cfg
    params = {k: np.asarray(v.get_value(), np.float32) for k, v in param_paths(model).items()}
    g_name, v_name = (
        ("weight_g", "weight_v")
        if legacy
        else ("parametrizations.weight.original0", "parametrizations.weight.original1")
    )
    out: dict[str, np.ndarray] = {}
    for flax_module, module in _module_table(cfg, LAYOUTS["hf"]).items():
        if flax_module == "lstm":
            for n in range(cfg.num_lstm_layers):
                bias = params[f"lstm.{n}.input.bias"]
                out[f"{module}.weight_ih_l{n}"] = params[f"lstm.{n}.input.kernel"].T.copy()
                out[f"{module}.weight_hh_l{n}"] = params[f"lstm.{n}.recurrent.kernel"].T.copy()
                out[f"{module}.bias_ih_l{n}"] = bias
                out[f"{module}.bias_hh_l{n}"] = np.zeros_like(bias)
            continue
        weight = params[f"{flax_module}.kernel"].transpose(2, 1, 0).copy()
        out[f"{module}.{g_name}"] = np.sqrt(np.sum(np.square(weight), axis=(1, 2), keepdims=True))
        out[f"{module}.{v_name}"] = weight
        out[f"{module}.bias"] = params[f"{flax_module}.bias"]
    for k in range(cfg.num_codebooks):
        out[LAYOUTS["hf"].codebook.format(k=k)] = params["codebooks"][k]
    return out


CHECKPOINT_KIND = "encodec checkpoint"


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m convert.encodec", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="HF directory, .safetensors/.bin file, or audiocraft .th/.pt")
    parser.add_argument("out", help="output bossa-jax checkpoint directory")
    parser.add_argument("--format", choices=("auto", "hf", "audiocraft"), default="auto")
    add_output_options(parser)
    args = parser.parse_args(argv)
    check_output(
        args.out, CHECKPOINT_KIND, folder=True, overwrite=args.overwrite, sources=[args.src]
    )
    model = convert_encodec(args.src, fmt=args.format)
    save_module(
        args.out, model, config_section(model.cfg), kind=CHECKPOINT_KIND, overwrite=args.overwrite
    )
    cfg = model.cfg
    print(
        f"wrote {args.out}: EnCodec {cfg.sampling_rate} Hz, ratios {list(cfg.upsampling_ratios)}, "
        f"{cfg.num_filters} filters, {cfg.num_codebooks} x {cfg.codebook_size} codebooks "
        f"(dim {cfg.codebook_dim})"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
