"""Configs: frozen dataclasses, YAML with includes, ``key=value`` overrides (DESIGN "Configs").

A YAML file may name a base with ``include: other.yaml`` (relative to the file; a list is merged in
order); its own keys override the base's, recursively. Command-line overrides use dotted keys
(``musicgen.keep_layers=4``) and YAML values (a string field takes its text as it is). Every
unknown key, wrong type or impossible value raises a :class:`~bossa_jax.errors.ConfigError` that
names the dotted key, when the config is loaded; every bad file names the file.

Sections are frozen dataclasses deriving :class:`Section`. Each numeric or choice field is declared
with :func:`option` and its :class:`Check` (``POSITIVE``, ``NON_NEGATIVE``, ``PROBABILITY``, ...),
which the one :meth:`Section.validate` applies; ``official=`` marks the value that reproduces the
official code (``configs/official.yaml`` sets them all). New sections are new fields of
:class:`Config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bossa_jax.errors import ConfigError, one_line

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = ("float32", "bfloat16", "float16")
STAGE1_LOSSES = ("itc", "itm", "itg")  # contrastive, matching, grounded generation (SPEC 3)
T = TypeVar("T")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


# ---------------------------------------------------------------------------------------------
# Field rules: every field of a config section that is a size, count, rate, probability,
# duration or a choice declares its rule with :func:`option`; :meth:`Section.validate` applies
# them all (tests/test_config.py checks that no numeric field is left without one).


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule for one field value: ``holds(value)``, else the error says ``says``. Applied to each
    item of a tuple and each value of a mapping; ``None`` (an optional field left unset) passes."""

    holds: Callable[[Any], bool]
    says: str

    def apply(self, value: Any, key: str) -> None:
        if value is None:
            return
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                self.apply(item, f"{key}[{i}]")
        elif isinstance(value, Mapping):
            for name, item in value.items():
                self.apply(item, _join(key, str(name)))
        else:
            _require(self.holds(value), key, f"{self.says}, got {value!r}")


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


POSITIVE = Check(lambda v: _finite(v) and v > 0, "must be > 0")
NON_NEGATIVE = Check(lambda v: _finite(v) and v >= 0, "must be >= 0")
PROBABILITY = Check(lambda v: 0 <= v < 1, "must be in [0, 1)")  # NaN fails every comparison
FRACTION = Check(lambda v: 0 < v <= 1, "must be in (0, 1]")
MESH_SIZE = Check(lambda v: v == -1 or v >= 1, "must be >= 1, or -1 for all remaining devices")


def one_of(*choices: Any) -> Check:
    return Check(lambda v: v in choices, f"must be one of {', '.join(map(repr, choices))}")


_NO_OFFICIAL = object()


def option(default: T, check: Check | None = None, *, official: Any = _NO_OFFICIAL) -> T:
    """A config field with its rule. ``official``: the value that reproduces the official code
    where our default fixes or changes its behaviour (SPEC 10); ``configs/official.yaml`` sets
    every such field to it (see :func:`official_options`)."""
    metadata: dict[str, Any] = {"check": check}
    if official is not _NO_OFFICIAL:
        metadata["official"] = official
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Section:
    """Base of the config dataclasses: :meth:`validate` applies every field's :class:`Check`,
    validates nested sections, then the section's own cross-field rules
    (:meth:`check_relations`). Every error is one line naming the dotted key."""

    def validate(self, prefix: str) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value, key = getattr(self, field.name), _join(prefix, field.name)
            if isinstance(value, Section):
                value.validate(key)
            elif field.metadata.get("check") is not None:
                field.metadata["check"].apply(value, key)
        self.check_relations(prefix)

    def check_relations(self, prefix: str) -> None:
        """Rules between fields (run after every field's own rule holds)."""


def _divides_hidden(section: Any, prefix: str) -> None:
    _require(
        section.hidden_size % section.num_attention_heads == 0,
        _join(prefix, "num_attention_heads"),
        f"must divide hidden_size ({section.hidden_size}), got {section.num_attention_heads}",
    )


@dataclasses.dataclass(frozen=True)
class EncodecConfig(Section):
    """EnCodec-32kHz encoder (SPEC 1.1; HF ``EncodecConfig`` field names where they exist)."""

    sampling_rate: int = option(32000, POSITIVE)
    audio_channels: int = option(1, POSITIVE)
    num_filters: int = option(64, POSITIVE)
    upsampling_ratios: tuple[int, ...] = option((8, 5, 4, 4), POSITIVE)
    hidden_size: int = option(128, POSITIVE)
    num_lstm_layers: int = option(2, POSITIVE)
    kernel_size: int = option(7, POSITIVE)
    last_kernel_size: int = option(7, POSITIVE)
    residual_kernel_size: int = option(3, POSITIVE)
    num_residual_layers: int = option(1, POSITIVE)
    dilation_growth_rate: int = option(2, POSITIVE)
    compress: int = option(2, POSITIVE)
    use_causal_conv: bool = False
    pad_mode: str = option("reflect", one_of("reflect", "constant"))
    # residual-block skip: False = identity (EnCodec-32kHz, audiocraft true_skip), True = 1x1 conv
    use_conv_shortcut: bool = False
    codebook_size: int = option(2048, POSITIVE)
    codebook_dim: int = option(128, POSITIVE)
    num_codebooks: int = option(4, POSITIVE)

    def check_relations(self, prefix: str) -> None:
        _require(
            self.codebook_dim == self.hidden_size,
            f"{prefix}.codebook_dim",
            f"must equal hidden_size ({self.hidden_size}) for EnCodec-32kHz",
        )
        _require(
            len(self.upsampling_ratios) > 0, f"{prefix}.upsampling_ratios", "must not be empty"
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
class MusicgenConfig(Section):
    """The frozen MusicGen decoder, truncated to its first ``keep_layers`` blocks (SPEC 1.2-1.3)."""

    hidden_size: int = option(2048, POSITIVE)
    num_attention_heads: int = option(32, POSITIVE)
    ffn_dim: int = option(8192, POSITIVE)
    num_codebooks: int = option(4, POSITIVE)
    vocab_size: int = option(2048, POSITIVE)  # the special/pad id is vocab_size (2048)
    num_hidden_layers: int = option(48, POSITIVE)  # of the source checkpoint
    keep_layers: int = option(25, POSITIVE)  # 48 // 2 + 1 (SPEC 1.3)
    max_position_embeddings: int = option(2048, POSITIVE)
    layer_norm_eps: float = option(1e-5, POSITIVE)
    dtype: str = option("float32", one_of(*DTYPES))  # compute and parameter dtype of the stack

    def check_relations(self, prefix: str) -> None:
        _divides_hidden(self, prefix)
        _require(
            self.keep_layers <= self.num_hidden_layers,
            f"{prefix}.keep_layers",
            f"must be in 1..num_hidden_layers ({self.num_hidden_layers}), got {self.keep_layers}",
        )
        _require(
            self.num_codebooks == 4,
            f"{prefix}.num_codebooks",
            "BOSSA's delay pattern needs exactly 4 codebooks (SPEC 9.2)",
        )

    @property
    def special_id(self) -> int:
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class QFormerConfig(Section):
    """The BOSSA Q-Former: a MusicBERT-initialised BERT with queries (SPEC 2.1-2.2)."""

    hidden_size: int = option(768, POSITIVE)
    num_hidden_layers: int = option(12, POSITIVE)
    num_attention_heads: int = option(12, POSITIVE)
    intermediate_size: int = option(3072, POSITIVE)
    hidden_act: str = option("gelu", one_of("gelu", "gelu_tanh", "relu", "silu"))
    # MusicBERT octuple dictionary; the input table has one more row ([DEC])
    vocab_size: int = option(1237, POSITIVE)
    max_position_embeddings: int = option(8194, POSITIVE)
    pad_token_id: int = option(1, NON_NEGATIVE)
    encoder_width: int = option(2048, POSITIVE)  # = MusicGen d_model
    cross_attention_freq: int = option(2, POSITIVE)  # cross-attention in layers i % freq == 0
    num_query_tokens: int = option(32, POSITIVE)
    # bert-base (MusicBERT itself was trained with 1e-5)
    layer_norm_eps: float = option(1e-12, POSITIVE)
    hidden_dropout: float = option(0.1, PROBABILITY)
    attention_dropout: float = option(0.1, PROBABILITY)
    # recompute each layer's activations in the backward pass instead of storing them: trades
    # ~1/3 more Q-Former compute for memory (paper size on TPU v5e-16 needs it)
    remat: bool = False
    # the note stream (word/position embeddings, downsampling, text FFNs, LM head): stage 1 needs
    # it; stage 2 deletes it and keeps only the query branch (SPEC 4.1)
    symbolic_branch: bool = True

    def check_relations(self, prefix: str) -> None:
        _divides_hidden(self, prefix)
        _require(
            self.pad_token_id < self.vocab_size,
            f"{prefix}.pad_token_id",
            f"must be in 0..vocab_size-1 ({self.vocab_size - 1}), got {self.pad_token_id}",
        )

    @property
    def dec_token_id(self) -> int:
        """The [DEC] id: the extra last row of the input table (SPEC 2.3)."""
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class AudioConfig(Section):
    """Clip geometry shared by audio I/O, feature extraction and segmentation (SPEC 1.1), and
    the frozen audio front end the Q-Former reads: ``musicgen`` (the paper's MusicGen features,
    width ``musicgen.hidden_size``) or ``mel`` (log-mel frames of width ``n_mels`` at the same
    50 frames/s and clip geometry, for when no MusicGen weights exist: ``bossa_jax.mel``)."""

    clip_frames: int = option(508, POSITIVE)  # 10.16 s at 50 Hz
    min_seconds: float = option(0.5, NON_NEGATIVE)
    frontend: str = option("musicgen", one_of("musicgen", "mel"))
    n_mels: int = option(64, POSITIVE)

    @property
    def pattern_steps(self) -> int:
        """Delay-pattern length fed to MusicGen: clip frames + 4 (SPEC 1.2)."""
        return self.clip_frames + 4


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Device mesh and the one logical-axis rules table (DESIGN "Sharding is declared next to the
    parameters"). ``shape`` maps each mesh axis to its size; one size may be -1 (all the rest)."""

    shape: Mapping[str, int] = option({"data": -1, "fsdp": 1, "tensor": 1}, MESH_SIZE)
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

    def check_relations(self, prefix: str) -> None:
        axes = tuple(self.shape)
        _require(
            axes == ("data", "fsdp", "tensor"),
            f"{prefix}.shape",
            f"must name the axes data, fsdp, tensor in that order, got {list(axes)}",
        )
        sizes = list(self.shape.values())
        _require(sum(s == -1 for s in sizes) <= 1, f"{prefix}.shape", "at most one size may be -1")
        for logical, mesh_axes in self.rules:
            targets = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
            for t in targets:
                _require(
                    t is None or t in axes,
                    f"{prefix}.rules",
                    f"logical axis '{logical}' maps to unknown mesh axis {t!r}",
                )


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW with linear warm-up then cosine decay (SPEC 7; built by ``bossa_jax.train.optim``).

    ``decay_mask``: "all" = weight decay on every trainable parameter, LayerNorms, biases, query
    tokens and temperature included (official, SPEC 10.15); "exclude_norms_biases" exempts those.
    ``grad_clip_norm``: null = no clipping (official stage 1, SPEC 10.14; stage 2 clips at 1.0).
    """

    lr: float = option(1e-4, POSITIVE)
    betas: tuple[float, float] = option((0.9, 0.999), PROBABILITY)
    eps: float = option(1e-8, POSITIVE)
    weight_decay: float = option(0.05, NON_NEGATIVE)
    warmup_steps: int = option(1000, NON_NEGATIVE)
    warmup_start_factor: float = option(0.01, FRACTION)
    min_lr: float = option(1e-5, NON_NEGATIVE)  # CosineAnnealingLR eta_min
    decay_mask: str = option("all", one_of("all", "exclude_norms_biases"), official="all")
    grad_clip_norm: float | None = option(None, POSITIVE, official=None)

    def check_relations(self, prefix: str) -> None:
        _require(self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, lr={self.lr}]")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The training loop (SPEC 7, DESIGN "Checkpoints"; run by ``bossa_jax.train.loop``).

    Steps count optimizer updates. ``eval_every``/``checkpoint_every`` 0 = never (a final
    checkpoint is still written). ``global_batch_size`` must be divisible by the mesh's batch
    shards and by the process count (checked when the mesh is known).
    """

    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    total_steps: int = option(10000, POSITIVE)
    global_batch_size: int = option(128, POSITIVE)
    log_every: int = option(50, POSITIVE)
    eval_every: int = option(0, NON_NEGATIVE)
    checkpoint_every: int = option(1000, NON_NEGATIVE)
    keep_checkpoints: int = option(3, POSITIVE)
    seed: int = option(0, Check(lambda v: 0 <= v < 2**32, "must be in 0..2**32-1"))
    compute_dtype: str = option("bfloat16", one_of("bfloat16", "float32"))
    out_dir: str = "runs/default"

    def check_relations(self, prefix: str) -> None:
        _require(
            self.total_steps > self.optim.warmup_steps,
            f"{prefix}.total_steps",
            f"must exceed optim.warmup_steps ({self.optim.warmup_steps})",
        )
        _require(bool(self.out_dir), f"{prefix}.out_dir", "must not be empty")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """The corpus and its pipeline, one section for both training stages (SPEC 6, 7; read by
    ``bossa_jax.train.stage1`` and ``bossa_jax.train.stage2``).

    ``audio_input``: "codes" = EnCodec codes in the batch, the frozen MusicGen runs inside the
    step (bf16, no gradient); "features" = cached MusicGen features in the batch (no MusicGen in
    the step). ``dataset``: pop909 / piast / manifest (``data_dir`` = POP909 root, PIAST MIDI root
    or manifest .jsonl) or synthetic (a small generated corpus under ``data_dir``). ``codes_dir``:
    the per-song codes store; ``feature_cache_dir``: per-split feature caches (built from the codes
    with ``musicgen_checkpoint`` when missing; in codes mode it also initialises the frozen
    MusicGen; codes mode without one (or a stage's ``init_from`` holding MusicGen) is refused
    unless ``random_musicgen`` asks for random MusicGen weights, for smoke runs).
    ``feature_dtype``: how a new feature cache stores the features (bfloat16, float16 or float32;
    batches carry that dtype).

    Official behaviour (``configs/official.yaml`` sets all of it): ``keep_eos`` True keeps the EOS
    octuple when a window's notes overflow the sequence, False is the official plain cut (SPEC
    11.11); ``clamp_clips`` True clamps training clips into the song, False is the official slice
    whose negative start gives an empty clip (SPEC 10.12); ``transpose`` applies to validation
    too, as in the official code (SPEC 10.6).
    """

    audio_input: str = option("codes", one_of("codes", "features"))
    dataset: str = option("pop909", one_of("pop909", "piast", "manifest", "synthetic"))
    data_dir: str = ""
    audio_dir: str = ""
    split_file: str = ""
    codes_dir: str = ""
    feature_cache_dir: str = ""
    feature_dtype: str = option("bfloat16", one_of("bfloat16", "float16", "float32"))
    musicgen_checkpoint: str = ""
    random_musicgen: bool = False
    synthetic_songs: int = option(8, POSITIVE)
    synthetic_bars: int = option(16, POSITIVE)
    transpose: bool = option(True, official=True)
    deperf: bool = option(True, official=True)
    keep_eos: bool = option(True, official=False)
    clamp_clips: bool = option(True, official=False)
    num_threads: int = option(2, POSITIVE)
    prefetch: int = option(4, NON_NEGATIVE)


# the data settings both stages share were the ``stage1`` section's: an old config key gets a
# one-line error naming its new place, not a generic unknown-key error
MOVED_KEYS = {f"stage1.{f.name}": f"data.{f.name}" for f in dataclasses.fields(DataConfig)}


@dataclasses.dataclass(frozen=True)
class Stage1Config(Section):
    """Stage-1 initialisation and objective (SPEC 3, 7; run by ``bossa_jax.train.stage1``; its
    data are the ``data`` section's).

    ``qformer_init``: a Q-Former checkpoint (``python -m convert.musicbert``) to start from;
    ``init_from``: a stage-1 checkpoint (``convert.bossa`` / ``save_stage1``) to start from (not
    both). ``eval_batches``: validation batches per eval.

    ``losses``: the stage-1 objectives summed into the training loss (SPEC 3.6; paper Table 2's
    ablations): any of ``itc`` (contrastive), ``itm`` (matching), ``itg`` (grounded generation),
    each at most once; the default (and the official code) trains all three. A left-out objective
    is not computed at all (its forward pass is skipped), so an ablation costs less per step.

    Official behaviour (``configs/official.yaml`` sets all of it): ``field_mean`` the ITG per-field
    mean, "valid" (default: over the valid targets) or "official" (over every slot, SPEC 10.13).
    """

    qformer_init: str = ""
    init_from: str = ""
    field_mean: str = option("valid", one_of("valid", "official"), official="official")
    dropout: bool = option(True, official=True)
    eval_batches: int = option(2, NON_NEGATIVE)
    losses: tuple[str, ...] = option(STAGE1_LOSSES, one_of(*STAGE1_LOSSES))

    def check_relations(self, prefix: str) -> None:
        _require(
            bool(self.losses), f"{prefix}.losses", f"must name at least one of {STAGE1_LOSSES}"
        )
        _require(
            len(set(self.losses)) == len(self.losses),
            f"{prefix}.losses",
            f"names a loss twice: {list(self.losses)}",
        )
        _require(
            not (self.qformer_init and self.init_from),
            f"{prefix}.qformer_init",
            "give qformer_init or init_from, not both",
        )


@dataclasses.dataclass(frozen=True)
class MuseCocoConfig(Section):
    """MuseCoco-xLarge, the frozen symbolic LM of stage 2, with LoRA on q/k/v (SPEC 4.4, 4.5).

    HF-port names: vocab_size = ``vocab_size``, hidden_size = ``n_embd``, num_attention_heads =
    ``n_head``, num_hidden_layers = ``n_layer``, ffn_dim = ``ffn_dim``, max_positions =
    ``n_positions``. Heads are ``hidden_size // num_attention_heads`` wide; the remainder of a
    width the heads do not divide is dropped (2048 / 24 -> 85, q/k/v 2040 wide). ``dtype`` is the
    parameter and compute dtype of the base model (LayerNorm statistics and the linear-attention
    sums stay fp32); the LoRA matrices are fp32 (trained). ``chunk_size``: the chunk of the
    parallel linear-attention form (memory O(L d + chunk^2) per head).
    """

    vocab_size: int = option(1253, POSITIVE)
    hidden_size: int = option(2048, POSITIVE)
    num_attention_heads: int = option(24, POSITIVE)
    num_hidden_layers: int = option(24, POSITIVE)
    ffn_dim: int = option(8192, POSITIVE)
    max_positions: int = option(8192, POSITIVE)
    padding_idx: int = option(1, NON_NEGATIVE)
    dropout: float = option(0.1, PROBABILITY)
    layer_norm_eps: float = option(1e-5, POSITIVE)
    lora: bool = True
    lora_rank: int = option(16, POSITIVE)
    lora_scale: float = option(1.0, NON_NEGATIVE)
    dtype: str = option("bfloat16", one_of(*DTYPES))
    chunk_size: int = option(128, POSITIVE)

    def check_relations(self, prefix: str) -> None:
        _require(
            self.hidden_size >= self.num_attention_heads,
            f"{prefix}.hidden_size",
            f"must be >= num_attention_heads ({self.num_attention_heads}), got {self.hidden_size}",
        )
        _require(
            self.padding_idx < self.vocab_size,
            f"{prefix}.padding_idx",
            f"must be in 0..vocab_size-1 ({self.vocab_size - 1}), got {self.padding_idx}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Stage2OptimConfig(OptimConfig):
    """Stage 2's AdamW: stage 1's, with the official global-norm clipping at 1.0 (SPEC 7)."""

    grad_clip_norm: float | None = option(1.0, POSITIVE, official=1.0)


@dataclasses.dataclass(frozen=True)
class Stage2TrainConfig(TrainConfig):
    """Stage 2's loop: the official global batch of 32 (SPEC 7), clipping at 1.0."""

    optim: Stage2OptimConfig = dataclasses.field(default_factory=Stage2OptimConfig)
    global_batch_size: int = option(32, POSITIVE)
    out_dir: str = "runs/stage2"


@dataclasses.dataclass(frozen=True)
class Stage2Config(Section):
    """Stage-2 model, initialisation and training (SPEC 4, 7; run by ``bossa_jax.train.stage2``).

    ``train``: stage 2's own loop settings (batch 32, clipping 1.0; stage 1 uses the top-level
    ``train``). Its data are the ``data`` section's (both stages read one corpus).
    ``init_from``: a stage-1 checkpoint (``convert.bossa`` / ``save_stage1`` / export) for
    the audio LayerNorm, the Q-Former's query branch and, when it has one, MusicGen;
    ``musecoco_checkpoint``: a converted MuseCoco (``python -m convert.musecoco``). Unset, those
    parts stay randomly initialised (smoke runs only; a warning says so). ``trainable``:
    "official" (SPEC 4.2: query-only Q-Former, audio LayerNorm, LoRA, projection; 117 M at paper
    size) or "lora_projection" (the paper's LoRA + projection). ``dropout``: the Q-Former's
    dropout in training, as the official code. ``musecoco_dropout``: dropout inside the frozen
    MuseCoco in training: the official quirk (SPEC 10.17); our default runs it deterministic.
    """

    train: Stage2TrainConfig = dataclasses.field(default_factory=Stage2TrainConfig)
    init_from: str = ""
    musecoco_checkpoint: str = ""
    trainable: str = option("official", one_of("official", "lora_projection"), official="official")
    dropout: bool = option(True, official=True)
    musecoco_dropout: bool = option(False, official=True)
    eval_batches: int = option(2, NON_NEGATIVE)
    # tokens per stage-2 sequence (SPEC 6.5: 1000); stage 0 of BOSSA-mini uses the same layout
    max_tokens: int = option(1000, POSITIVE)


@dataclasses.dataclass(frozen=True)
class Stage0TrainConfig(TrainConfig):
    """Stage 0's loop: a small batch of whole stage-2 sequences, fp32 on a CPU."""

    global_batch_size: int = option(8, POSITIVE)
    compute_dtype: str = option("float32", one_of("bfloat16", "float32"))
    out_dir: str = "runs/stage0"


@dataclasses.dataclass(frozen=True)
class Stage0Config(Section):
    """Stage 0 of BOSSA-mini (issue 11): pre-training the symbolic LM that stage 2 then freezes,
    when no MuseCoco weights exist (run by ``bossa_jax.train.lm``). The model is MuseCoco with the
    ``musecoco`` section's sizes, without LoRA; it reads the stage-2 sequences of the corpus
    (``</s>`` + attributes + ``<sep>`` + lead sheet + ``<sep>`` + arrangement + ``</s>``, SPEC
    6.5; the ``stage1`` section's data settings) with next-token cross-entropy on the arrangement
    and, with ``prompt_loss``, on the lead-sheet prompt too, so the frozen LM already continues a
    lead-sheet prompt with an arrangement. ``dropout``: MuseCoco's dropout in training.

    Style attribute (as MuseCoco itself was pre-trained on attributes, SPEC 5.1): with
    ``style_attribute_rate`` > 0, that share of the training sequences whose song's manifest
    ``style`` is the k-th of ``styles`` carry the genre attribute ``S4_<k>_0`` instead of the
    prompt's ``S4_<k>_2`` (not given); the rest keep the prompt stage 2 and inference use. The LM
    so learns what a style prefix means, and stage 2 only has to map the audio queries onto it.
    Evaluation keeps the plain prompt."""

    train: Stage0TrainConfig = dataclasses.field(default_factory=Stage0TrainConfig)
    prompt_loss: bool = True
    dropout: bool = False
    eval_batches: int = option(2, NON_NEGATIVE)
    style_attribute_rate: float = option(0.0, PROBABILITY)
    styles: tuple[str, ...] = ()

    def check_relations(self, prefix: str) -> None:
        from bossa_jax.symbolic.remi import NUM_GENRES

        _require(
            len(self.styles) <= NUM_GENRES,
            _join(prefix, "styles"),
            f"at most {NUM_GENRES} (MuseCoco's genre attributes), got {len(self.styles)}",
        )
        _require(
            self.style_attribute_rate == 0 or len(self.styles) > 0,
            _join(prefix, "style_attribute_rate"),
            "needs stage0.styles (the style labels, in the order of their genre attributes)",
        )


@dataclasses.dataclass(frozen=True)
class ArrangeConfig(Section):
    """Windowed arrangement of lead sheets (SPEC 8.1, 8.2, 10.19, 11.11-11.14; run by
    ``bossa_jax.arrange``).

    Sampling: ``top_k`` (the notebook's 15; sheetsage_inference.py uses 5), ``temperature``,
    ``top_p`` (1.0: no nucleus filter), ``max_new_tokens`` per window (null: the official cap,
    2048 minus the window's prompt length). ``songs_per_batch``: songs whose k-th windows share one
    sampler call. ``pedal``: the rule-based sustain pedal of SPEC 8.2. ``encodec_checkpoint``: the
    converted EnCodec (``python -m convert.encodec``) that encodes the reference audio for the
    ``musicgen`` front end (a checkpoint directory's ``encodec/`` folder is used when this is
    empty); ``chunk_seconds``: the fixed encode chunk (as the codes store).

    Official behaviour (``configs/official.yaml``): ``official_overrun`` True: every window samples
    until its 4th ``b-1``, past its lead sheet, and the last window is kept whole (SPEC 11.12);
    ours stops each window at the end of its lead sheet. ``official_carry`` True: the stopping
    ``b-1`` is not kept and the carried bars are the official slice, whose fallback end index drops
    the last generated token (SPEC 10.19); ours keeps complete bars.

    ``melody_lock`` (ours, off by default and in the official code): the sampler places every
    lead-sheet melody note itself (pitch, onset and duration, :class:`bossa_jax.sampling.
    MelodyLock`) and the model draws everything else; for models that do not copy the melody
    reliably (BOSSA-mini). Melody preservation is then 1 by construction, not a model figure.
    """

    top_k: int = option(15, POSITIVE)
    temperature: float = option(1.0, POSITIVE)
    top_p: float = option(1.0, FRACTION)
    max_new_tokens: int | None = option(None, POSITIVE)
    songs_per_batch: int = option(64, POSITIVE)
    pedal: bool = option(False, official=True)
    official_overrun: bool = option(False, official=True)
    official_carry: bool = option(False, official=True)
    melody_lock: bool = False
    encodec_checkpoint: str = ""
    chunk_seconds: float = option(30.0, POSITIVE)


@dataclasses.dataclass(frozen=True)
class Config(Section):
    """The whole resolved configuration of a run."""

    name: str = "default"
    encodec: EncodecConfig = dataclasses.field(default_factory=EncodecConfig)
    musicgen: MusicgenConfig = dataclasses.field(default_factory=MusicgenConfig)
    audio: AudioConfig = dataclasses.field(default_factory=AudioConfig)
    qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stage1: Stage1Config = dataclasses.field(default_factory=Stage1Config)
    musecoco: MuseCocoConfig = dataclasses.field(default_factory=MuseCocoConfig)
    stage2: Stage2Config = dataclasses.field(default_factory=Stage2Config)
    arrange: ArrangeConfig = dataclasses.field(default_factory=ArrangeConfig)
    stage0: Stage0Config = dataclasses.field(default_factory=Stage0Config)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)

    def check_relations(self, prefix: str) -> None:
        # the Q-Former's cross-attention reads the front end's frames directly (SPEC 1.3)
        if self.audio.frontend == "mel":
            width_key, width = "audio.n_mels", self.audio.n_mels
            _require(
                self.data.audio_input == "features",
                _join(prefix, "data.audio_input"),
                "must be 'features' with audio.frontend=mel (codes feed MusicGen)",
            )
        else:
            width_key, width = "musicgen.hidden_size", self.musicgen.hidden_size
        _require(
            self.qformer.encoder_width == width,
            _join(prefix, "qformer.encoder_width"),
            f"must equal {width_key} ({width}) for audio.frontend={self.audio.frontend}, "
            f"got {self.qformer.encoder_width}",
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def official_options(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every field with an official value, by dotted key: the options that select the official
    code's behaviour where ours differs or where it is a choice (SPEC 10, 11)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = _join(prefix, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            out.update(official_options(hints[field.name], key))
        elif "official" in field.metadata:
            out[key] = field.metadata["official"]
    return out


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
        # YAML 1.1 reads 5e-4 (no dot) as a string: take what Python's float() takes
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
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
            moved = MOVED_KEYS.get(_join(prefix, str(key)))
            if moved is not None:
                raise ConfigError(f"config key '{_join(prefix, str(key))}' moved to '{moved}'")
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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a YAML error (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or one_line(str(err))
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _includes(data: dict[str, Any], path: Path) -> list[str]:
    """The ``include`` key's file names (one name or a list), removed from ``data``."""
    if "include" not in data:
        return []
    includes = data.pop("include")
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not includes:
        raise ConfigError(
            f"config file {path}: 'include' must be a file name or a list of file names, "
            f"got {includes!r}"
        )
    for name in includes:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config file {path}: 'include' entry {name!r} is not a file name")
    return includes


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a config file with its includes resolved (includes first, the file's keys last).

    A missing or unreadable file, a directory, a file that is not UTF-8 YAML holding a mapping, a
    bad ``include`` and an include cycle are each a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.exists() and not path.suffix:
        candidate = CONFIG_DIR / f"{path}.yaml"
        path = candidate if candidate.exists() else path
    where = f" (included by {_chain[-1]})" if _chain else ""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}{where}")
    if not path.is_file():
        raise ConfigError(f"config file {path}{where} is a directory, not a YAML file")
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain[_chain.index(path) :], path))
        raise ConfigError(f"config file {path}: include cycle {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML"
        ) from err
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({_yaml_problem(err)})") from err
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = dict(data)
    merged: dict[str, Any] = {}
    for name in _includes(data, path):
        merged = _merge(merged, read_yaml(path.parent / name, _chain + (path,)))
    return _merge(merged, data)


def _key_type(parts: Sequence[str]) -> Any:
    """The annotation of the dotted key ``parts`` in :class:`Config` (None if unknown)."""
    tp: Any = Config
    for part in parts:
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif typing.get_origin(tp) in (Mapping, dict):
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def _override_value(key: str, raw: str) -> Any:
    """An override's value: YAML, except that a string field takes the text as it is when it is
    not a YAML string (``name=123``, ``data.data_dir=[a``); YAML that does not parse is an error
    for every other field."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        if _key_type(key.split(".")) is str:
            return raw
        raise ConfigError(
            f"config key '{key}': override value {raw!r} is not valid YAML ({_yaml_problem(err)})"
        ) from err
    if _key_type(key.split(".")) is str and not isinstance(value, str):
        return raw
    return value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=[1, 2]"]`` into a nested mapping (values parsed by
    :func:`_override_value`)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or "" in key.split("."):
            raise ConfigError(f"override {item!r} has an empty key")
        if key in MOVED_KEYS:
            raise ConfigError(f"config key '{key}' moved to '{MOVED_KEYS[key]}'")
        value = _override_value(key, raw)
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


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``config`` with ``key=value`` overrides applied, type-checked and validated."""
    if not overrides:
        return config
    data = _merge(config.to_dict(), parse_overrides(overrides))
    out = build(Config, data)
    out.validate()
    return out
