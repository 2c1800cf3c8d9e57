"""Configs: frozen dataclasses, YAML with includes, ``key=value`` overrides (DESIGN "Configs").

A YAML file may name a base with ``include: other.yaml`` (relative to the file; a list is merged in
order); its own keys override the base's, recursively. Command-line overrides use dotted keys
(``musicgen.keep_layers=4``) and YAML values. Every unknown key, wrong type or impossible value
raises a :class:`~bossa_jax.errors.ConfigError` that names the dotted key.

Later issues add their sections (Q-Former, MuseCoco, training, data, sampling) as new dataclasses
and fields of :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bossa_jax.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = ("float32", "bfloat16", "float16")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclasses.dataclass(frozen=True)
class EncodecConfig:
    """EnCodec-32kHz encoder (SPEC 1.1; HF ``EncodecConfig`` field names where they exist)."""

    sampling_rate: int = 32000
    audio_channels: int = 1
    num_filters: int = 64
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 4)
    hidden_size: int = 128
    num_lstm_layers: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    num_residual_layers: int = 1
    dilation_growth_rate: int = 2
    compress: int = 2
    use_causal_conv: bool = False
    pad_mode: str = "reflect"
    # residual-block skip: False = identity (EnCodec-32kHz, audiocraft true_skip), True = 1x1 conv
    use_conv_shortcut: bool = False
    codebook_size: int = 2048
    codebook_dim: int = 128
    num_codebooks: int = 4

    def validate(self, prefix: str) -> None:
        _require(
            self.pad_mode in ("reflect", "constant"),
            f"{prefix}.pad_mode",
            f"must be 'reflect' or 'constant', got {self.pad_mode!r}",
        )
        _require(
            self.codebook_dim == self.hidden_size,
            f"{prefix}.codebook_dim",
            f"must equal hidden_size ({self.hidden_size}) for EnCodec-32kHz",
        )
        for name in (
            "num_filters",
            "hidden_size",
            "num_lstm_layers",
            "codebook_size",
            "num_codebooks",
            "kernel_size",
            "compress",
        ):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(
            all(r > 0 for r in self.upsampling_ratios),
            f"{prefix}.upsampling_ratios",
            "every ratio must be positive",
        )

    @property
    def hop_length(self) -> int:
        """Samples per code frame: the product of the ratios (640 for 32 kHz -> 50 Hz)."""
        hop = 1
        for r in self.upsampling_ratios:
            hop *= r
        return hop

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.hop_length


@dataclasses.dataclass(frozen=True)
class MusicgenConfig:
    """The frozen MusicGen decoder, truncated to its first ``keep_layers`` blocks (SPEC 1.2-1.3)."""

    hidden_size: int = 2048
    num_attention_heads: int = 32
    ffn_dim: int = 8192
    num_codebooks: int = 4
    vocab_size: int = 2048  # the special/pad id is vocab_size (2048)
    num_hidden_layers: int = 48  # of the source checkpoint
    keep_layers: int = 25  # 48 // 2 + 1 (SPEC 1.3)
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute and parameter dtype of the frozen stack

    def validate(self, prefix: str) -> None:
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"{prefix}.num_attention_heads",
            f"must divide hidden_size ({self.hidden_size}), got {self.num_attention_heads}",
        )
        _require(
            1 <= self.keep_layers <= self.num_hidden_layers,
            f"{prefix}.keep_layers",
            f"must be in 1..num_hidden_layers ({self.num_hidden_layers}), got {self.keep_layers}",
        )
        _require(
            self.num_codebooks == 4,
            f"{prefix}.num_codebooks",
            "BOSSA's delay pattern needs exactly 4 codebooks (SPEC 9.2)",
        )
        _require(self.dtype in DTYPES, f"{prefix}.dtype", f"must be one of {DTYPES}")

    @property
    def special_id(self) -> int:
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """The BOSSA Q-Former: a MusicBERT-initialised BERT with queries (SPEC 2.1-2.2)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    vocab_size: int = 1237  # MusicBERT octuple dictionary; the input table has one more row ([DEC])
    max_position_embeddings: int = 8194
    pad_token_id: int = 1
    encoder_width: int = 2048  # = MusicGen d_model
    cross_attention_freq: int = 2  # cross-attention in layers i % freq == 0
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12  # bert-base (MusicBERT itself was trained with 1e-5)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # recompute each layer's activations in the backward pass instead of storing them: trades
    # ~1/3 more Q-Former compute for memory (paper size on TPU v5e-16 needs it)
    remat: bool = False

    def validate(self, prefix: str) -> None:
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"{prefix}.num_attention_heads",
            f"must divide hidden_size ({self.hidden_size}), got {self.num_attention_heads}",
        )
        for name in (
            "num_hidden_layers",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "encoder_width",
            "cross_attention_freq",
            "num_query_tokens",
        ):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(
            0 <= self.pad_token_id < self.vocab_size,
            f"{prefix}.pad_token_id",
            f"must be in 0..vocab_size-1 ({self.vocab_size - 1}), got {self.pad_token_id}",
        )
        for name in ("hidden_dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{prefix}.{name}", "must be in [0, 1)")
        _require(
            self.hidden_act in ("gelu", "gelu_tanh", "relu", "silu"),
            f"{prefix}.hidden_act",
            f"unknown activation {self.hidden_act!r}",
        )

    @property
    def dec_token_id(self) -> int:
        """The [DEC] id: the extra last row of the input table (SPEC 2.3)."""
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Clip geometry shared by audio I/O, feature extraction and segmentation (SPEC 1.1)."""

    clip_frames: int = 508  # 10.16 s at 50 Hz
    min_seconds: float = 0.5

    def validate(self, prefix: str) -> None:
        _require(self.clip_frames > 0, f"{prefix}.clip_frames", "must be positive")

    @property
    def pattern_steps(self) -> int:
        """Delay-pattern length fed to MusicGen: clip frames + 4 (SPEC 1.2)."""
        return self.clip_frames + 4


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the one logical-axis rules table (DESIGN "Sharding is declared next to the
    parameters"). ``shape`` maps each mesh axis to its size; one size may be -1 (all the rest)."""

    shape: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1}
    )
    rules: tuple[tuple[str, Any], ...] = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("qkv", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("layers", None),
        ("length", None),
        ("codebook", None),
        ("query", None),
        ("lora", None),
        ("conv_in", None),
        ("conv_out", None),
        ("feature", None),
    )

    def validate(self, prefix: str) -> None:
        axes = tuple(self.shape)
        _require(
            axes == ("data", "fsdp", "tensor"),
            f"{prefix}.shape",
            f"must name the axes data, fsdp, tensor in that order, got {list(axes)}",
        )
        sizes = list(self.shape.values())
        _require(sum(s == -1 for s in sizes) <= 1, f"{prefix}.shape", "at most one size may be -1")
        _require(
            all(s == -1 or s >= 1 for s in sizes),
            f"{prefix}.shape",
            f"sizes must be >= 1 or -1, got {sizes}",
        )
        for logical, mesh_axes in self.rules:
            targets = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
            for t in targets:
                _require(
                    t is None or t in axes,
                    f"{prefix}.rules",
                    f"logical axis '{logical}' maps to unknown mesh axis {t!r}",
                )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (SPEC 7; built by ``bossa_jax.train.optim``).

    ``decay_mask``: "all" = weight decay on every trainable parameter, LayerNorms, biases, query
    tokens and temperature included (official, SPEC 10.15); "exclude_norms_biases" exempts those.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    warmup_start_factor: float = 0.01
    min_lr: float = 1e-5  # CosineAnnealingLR eta_min
    decay_mask: str = "all"
    grad_clip_norm: float | None = None  # stage 1: none (SPEC 10.14); stage 2: 1.0

    def validate(self, prefix: str) -> None:
        _require(self.lr > 0, f"{prefix}.lr", "must be positive")
        for i, b in enumerate(self.betas):
            _require(0.0 <= b < 1.0, f"{prefix}.betas", f"entry {i} must be in [0, 1), got {b}")
        _require(self.eps > 0, f"{prefix}.eps", "must be positive")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        _require(
            0.0 < self.warmup_start_factor <= 1.0,
            f"{prefix}.warmup_start_factor",
            f"must be in (0, 1], got {self.warmup_start_factor}",
        )
        _require(0.0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, lr={self.lr}]")
        _require(
            self.decay_mask in ("all", "exclude_norms_biases"),
            f"{prefix}.decay_mask",
            f"must be 'all' or 'exclude_norms_biases', got {self.decay_mask!r}",
        )
        _require(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"{prefix}.grad_clip_norm",
            "must be null or positive",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop (SPEC 7, DESIGN "Checkpoints"; run by ``bossa_jax.train.loop``).

    Steps count optimizer updates. ``eval_every``/``checkpoint_every`` 0 = never (a final
    checkpoint is still written). ``global_batch_size`` must be divisible by the mesh's batch
    shards and by the process count (checked when the mesh is known).
    """

    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    total_steps: int = 10000
    global_batch_size: int = 128
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    seed: int = 0
    compute_dtype: str = "bfloat16"
    out_dir: str = "runs/default"

    def validate(self, prefix: str) -> None:
        self.optim.validate(f"{prefix}.optim")
        for name in ("total_steps", "global_batch_size", "log_every", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        for name in ("eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0 (0 = never)")
        _require(
            self.total_steps > self.optim.warmup_steps,
            f"{prefix}.total_steps",
            f"must exceed optim.warmup_steps ({self.optim.warmup_steps})",
        )
        _require(
            self.compute_dtype in ("bfloat16", "float32"),
            f"{prefix}.compute_dtype",
            f"must be 'bfloat16' or 'float32', got {self.compute_dtype!r}",
        )
        _require(bool(self.out_dir), f"{prefix}.out_dir", "must not be empty")


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    """Stage-1 data and objective (SPEC 3, 6, 7; run by ``bossa_jax.train.stage1``).

    ``audio_input``: "codes" = EnCodec codes in the batch, the frozen MusicGen runs inside the
    step (bf16, no gradient); "features" = cached MusicGen features in the batch (no MusicGen in
    the step). ``dataset``: pop909 / piast / manifest (``data_dir`` = POP909 root, PIAST MIDI root
    or manifest .jsonl) or synthetic (a small generated corpus under ``data_dir``). ``codes_dir``:
    the per-song codes store; ``feature_cache_dir``: per-split feature caches (built from the codes
    with ``musicgen_checkpoint`` when missing; in codes mode it also initialises the frozen
    MusicGen; codes mode without one (or an ``init_from`` holding MusicGen) is refused unless
    ``random_musicgen`` asks for random MusicGen weights, for smoke runs). ``qformer_init``: a
    Q-Former checkpoint (``python -m convert.musicbert``) to start
    from; ``init_from``: a stage-1 checkpoint (``convert.bossa`` / ``save_stage1``) to start from
    (not both). ``field_mean``: ITG per-field mean, "valid"
    (default) or "official" (SPEC 10.13). ``eval_batches``: validation batches per eval.
    """

    audio_input: str = "codes"
    dataset: str = "pop909"
    data_dir: str = ""
    audio_dir: str = ""
    split_file: str = ""
    codes_dir: str = ""
    feature_cache_dir: str = ""
    musicgen_checkpoint: str = ""
    random_musicgen: bool = False
    qformer_init: str = ""
    init_from: str = ""
    synthetic_songs: int = 8
    synthetic_bars: int = 16
    transpose: bool = True
    deperf: bool = True
    field_mean: str = "valid"
    dropout: bool = True
    eval_batches: int = 2
    num_threads: int = 2
    prefetch: int = 4

    def validate(self, prefix: str) -> None:
        _require(
            self.audio_input in ("codes", "features"),
            f"{prefix}.audio_input",
            f"must be 'codes' or 'features', got {self.audio_input!r}",
        )
        _require(
            self.dataset in ("pop909", "piast", "manifest", "synthetic"),
            f"{prefix}.dataset",
            f"must be pop909, piast, manifest or synthetic, got {self.dataset!r}",
        )
        _require(
            self.field_mean in ("valid", "official"),
            f"{prefix}.field_mean",
            f"must be 'valid' or 'official', got {self.field_mean!r}",
        )
        _require(
            not (self.qformer_init and self.init_from),
            f"{prefix}.qformer_init",
            "give qformer_init or init_from, not both",
        )
        for name in ("synthetic_songs", "synthetic_bars", "num_threads"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        for name in ("eval_batches", "prefetch"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    name: str = "default"
    encodec: EncodecConfig = dataclasses.field(default_factory=EncodecConfig)
    musicgen: MusicgenConfig = dataclasses.field(default_factory=MusicgenConfig)
    audio: AudioConfig = dataclasses.field(default_factory=AudioConfig)
    qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    stage1: Stage1Config = dataclasses.field(default_factory=Stage1Config)

    def validate(self, prefix: str = "") -> None:
        for field in dataclasses.fields(self):
            section = getattr(self, field.name)
            if dataclasses.is_dataclass(section):
                section.validate(_join(prefix, field.name))
        # the Q-Former's cross-attention reads MusicGen features directly (SPEC 1.3)
        _require(
            self.qformer.encoder_width == self.musicgen.hidden_size,
            _join(prefix, "qformer.encoder_width"),
            f"must equal musicgen.hidden_size ({self.musicgen.hidden_size}), "
            f"got {self.qformer.encoder_width}",
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the key.


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts lists to tuples."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return tuple(_coerce(v, Any, key) for v in value) if isinstance(value, list) else value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, _join(key, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``; unknown keys and wrong types name the dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"unknown config key '{_join(prefix, str(key))}' "
                f"(known: {', '.join(sorted(names))})"
            )
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# YAML files, includes and overrides.


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a config file with its includes resolved (includes first, the file's keys last)."""
    path = Path(path)
    if not path.exists() and not path.suffix:
        candidate = CONFIG_DIR / f"{path}.yaml"
        path = candidate if candidate.exists() else path
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else list(includes)
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = _merge(merged, read_yaml(path.parent / inc, _seen + (path,)))
    return _merge(merged, data)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=[1, 2]"]`` into a nested mapping (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads, merges, type-checks and validates a config (``path`` None = the defaults)."""
    data = Config().to_dict()  # partial mappings (e.g. one mesh axis) merge onto the defaults
    if path is not None:
        data = _merge(data, read_yaml(path))
    data = _merge(data, parse_overrides(overrides))
    config = build(Config, data)
    config.validate()
    return config
