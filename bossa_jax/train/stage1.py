"""Stage-1 training: the sharded jitted step over :class:`~bossa_jax.models.bossa.Stage1Model`
and its data (SPEC 3, 6, 7, 11.7; DESIGN "Trainable vs frozen", "Precision", "Batches are global").

The step is the generic one of :mod:`bossa_jax.train.step` with the stage-1 losses
(:func:`~bossa_jax.models.bossa.stage1_loss_fn`: those ``stage1.losses`` names, by default ITC +
ITM + ITG, the 8 per-field LM losses and the temperature as metrics) and the one trainable
filter :data:`~bossa_jax.models.bossa.TRAINABLE` (everything but MusicGen). Two ways to get the
audio side (``data.audio_input``):

* ``codes``: EnCodec codes (B, 4, 508) in the batch; the frozen MusicGen runs inside the step,
  stored and computed in bf16 when ``train.compute_dtype`` is bf16, under ``stop_gradient`` and
  outside the trainable set, so neither ``jax.grad`` nor AdamW ever sees it;
* ``features``: cached MusicGen features (B, 512, D) in the batch (the stage-1 hot path); the model
  is built without MusicGen.

Trainable weights and AdamW state stay fp32 (master weights); the step casts them to the
compute dtype inside. AdamW uses the official warm-up + cosine schedule (``train.optim``); the
train state is donated; the step is compiled once ahead of the loop and its per-device memory
logged (:func:`bossa_jax.train.step.compile_ahead`). The global batch is one array sharded over the
mesh's batch axes, so the contrastive matrix and the hard negatives span the whole global batch.

Data: reader (POP909 / PIAST / JSONL manifest, or a generated synthetic corpus) -> songs of one
split -> per-song codes store -> corpus index -> :class:`~bossa_jax.data.pipeline.Pipeline` per
process (each process reads only its rows of every global batch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bossa_jax import checkpoint, sharding
from bossa_jax.config import Config, DataConfig, MusicgenConfig, QFormerConfig, Stage1Config
from bossa_jax.data import feature_cache as fc
from bossa_jax.data import pipeline as pl
from bossa_jax.data import readers, synthetic
from bossa_jax.errors import CheckpointError, ConfigError, DataError
from bossa_jax.models.bossa import (
    CHECKPOINT_KIND,
    TRAINABLE,
    Stage1Model,
    load_stage1,
    save_stage1,
    stage1_loss_fn,
)
from bossa_jax.models.qformer import QFormer
from bossa_jax.outputs import atomic_output
from bossa_jax.train import loop
from bossa_jax.train.optim import make_optimizer
from bossa_jax.train.step import (
    LossFn,
    TrainProgram,
    TrainState,
    batch_shardings,
    build_program,
    make_train_step,
    opt_state_shardings,
)

log = logging.getLogger("bossa_jax.train")

M = TypeVar("M", bound=nnx.Module)
SYMBOLIC_KEYS = ("notes", "leadsheet_mask", "pad_mask")
STAGE2_SYMBOLIC_KEYS = ("tokens", "control_mask", "pad_mask")
SPLIT_FILE = "split.json"  # of a synthetic corpus


# --- model and loss -----------------------------------------------------------------------------
def audio_key(cfg: DataConfig) -> str:
    """The batch field that carries the audio: ``codes`` or ``features``."""
    return "codes" if cfg.audio_input == "codes" else "features"


def model_keys(cfg: DataConfig, stage: int = 1) -> tuple[str, ...]:
    """The batch fields the step of ``stage`` consumes (bookkeeping fields are dropped)."""
    symbolic = SYMBOLIC_KEYS if stage == 1 else STAGE2_SYMBOLIC_KEYS
    return (*symbolic, "audio_mask", audio_key(cfg))


def frozen_musicgen_config(config: Config, compute: jnp.dtype) -> MusicgenConfig | None:
    """MusicGen's config in codes mode (bf16 under a bf16 compute dtype: frozen, no fp32
    master copy needed); None in features mode (no MusicGen in the step). Both stages."""
    if config.data.audio_input != "codes":
        return None
    dtype = "bfloat16" if compute == jnp.bfloat16 else config.musicgen.dtype
    return dataclasses.replace(config.musicgen, dtype=dtype)


def model_fn(config: Config) -> Callable[[], Stage1Model]:
    """The stage-1 model constructor for ``sharding.create_sharded``.

    With ``audio_input=codes`` MusicGen is part of the model; under a bf16 compute dtype it is
    created in bf16 (its parameters are frozen, so no fp32 master copy is needed). The Q-Former
    computes in the compute dtype; its parameters are created fp32 (the master weights).
    """
    compute = jnp.dtype(config.train.compute_dtype)
    musicgen = frozen_musicgen_config(config, compute)
    qformer_dtype = None if compute == jnp.float32 else compute

    def build() -> Stage1Model:
        return Stage1Model(
            config.qformer, musicgen, dtype=qformer_dtype, rngs=nnx.Rngs(config.train.seed)
        )

    return build


def write_params(
    target: nnx.Module, source: nnx.Module, where: str, *, skip: str | Callable[[str], bool] = ""
) -> int:
    """Copies every parameter of ``target`` from the one at the same path in ``source``, keeping
    the target's sharding and dtype (a source restored with the target's shardings,
    :func:`restore_for`, is not moved at all); paths under ``skip`` (a prefix, or a predicate on
    the dotted path) may be absent from ``source``. Returns how many were written. A missing
    parameter or another shape is a one-line CheckpointError naming ``where`` (the checkpoint)
    and the parameter."""
    available = {p: v for p, v in nnx.iter_graph(source) if isinstance(v, nnx.Param)}
    written = 0
    for path, var in nnx.iter_graph(target):
        if not isinstance(var, nnx.Param):
            continue
        key = ".".join(str(k) for k in path)
        value = available.get(path)
        if value is None:
            if skip(key) if callable(skip) else skip and key.startswith(skip):
                continue
            raise CheckpointError(f"{where}: no parameter '{key}' in the checkpoint")
        current, new = var[...], value[...]
        if tuple(new.shape) != tuple(current.shape):
            raise CheckpointError(
                f"{where}: parameter '{key}' has shape {tuple(new.shape)}, the model expects "
                f"{tuple(current.shape)}"
            )
        var[...] = jax.device_put(jnp.asarray(new, current.dtype), current.sharding)
        written += 1
    return written


def mesh_of(module: nnx.Module) -> Mesh | None:
    """The mesh ``module``'s parameters are sharded over; None when they are not (a model built
    outside ``sharding.use_mesh``)."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            placement = getattr(var.get_value(), "sharding", None)
            return placement.mesh if isinstance(placement, NamedSharding) else None
    return None


def restore_for(target: nnx.Module, load: Callable[..., M], path: Path, **kw: Any) -> M:
    """``load(path, **kw)`` for filling ``target``: straight into the shardings ``target`` is
    declared with on its mesh (``load(..., mesh=)``: each device reads only its shards, no whole
    parameter passes through one device or the host; call inside ``sharding.use_mesh``, as
    :func:`build_model` does), or, for a model not sharded over a mesh, outside any mesh (orbax
    cannot restore into the abstract shardings an active mesh gives ``nnx.eval_shape``)."""
    mesh = mesh_of(target)
    if mesh is not None:
        return load(path, mesh=mesh, **kw)
    with jax.set_mesh(Mesh(np.empty((), dtype=object), ())):
        return load(path, **kw)


def _load_qformer(path: Path, mesh: Mesh | None = None) -> QFormer:
    cfg = checkpoint.read_section(path, "qformer", QFormerConfig)
    return checkpoint.load_module(path, lambda: QFormer(cfg, rngs=nnx.Rngs(0)), mesh=mesh)


def init_fn(config: Config) -> Callable[[Stage1Model], Stage1Model]:
    """Writes converted weights into the sharded stage-1 model (part of :func:`build_model`).

    ``stage1.init_from`` (a stage-1 checkpoint) fills the whole model (MusicGen too when the
    checkpoint has it); ``stage1.qformer_init`` (``python -m convert.musicbert``) fills the
    Q-Former, the heads keep their fresh init (SPEC 2.3); ``data.musicgen_checkpoint`` fills the
    frozen MusicGen in codes mode. Codes mode without any MusicGen source is a ConfigError unless
    ``data.random_musicgen`` asks for random weights (smoke runs; a warning says so).
    """
    cfg = config.stage1

    def init(model: Stage1Model) -> Stage1Model:
        musicgen_loaded = False
        if cfg.init_from:
            path = _require_path(cfg.init_from, "init_from", "stage-1 checkpoint")
            source = restore_for(model, load_stage1, path)
            # MusicGen too when the checkpoint has it; without it, it must come from elsewhere
            write_params(model, source, str(path), skip="musicgen")
            musicgen_loaded = source.musicgen is not None
            log.info("initialised stage 1 from %s", path)
            del source
        if cfg.qformer_init:
            path = _require_path(cfg.qformer_init, "qformer_init", "converted Q-Former")
            source = restore_for(model.qformer, _load_qformer, path)
            write_params(model.qformer, source, str(path))
            log.info("initialised the Q-Former from %s", path)
        init_musicgen(model.musicgen, config.data, musicgen_loaded)
        return model

    return init


def _no_musicgen_error() -> ConfigError:
    return ConfigError(
        "config key 'data.musicgen_checkpoint': not set; codes mode runs the frozen MusicGen: "
        "give a converted MusicGen (python -m convert.musicgen) or a stage-1 init_from that holds "
        "one, or set data.random_musicgen=true for random weights (smoke runs only)"
    )


def check_musicgen_source(config: Config, init_from: str | None = None) -> None:
    """Codes mode needs MusicGen weights or an explicit ``data.random_musicgen`` (checked
    before any data is read; an ``init_from`` without MusicGen is caught when it is loaded).
    ``init_from``: the stage's checkpoint (default ``stage1.init_from``)."""
    cfg = config.data
    init_from = config.stage1.init_from if init_from is None else init_from
    if cfg.audio_input == "codes" and not (
        cfg.musicgen_checkpoint or init_from or cfg.random_musicgen
    ):
        raise _no_musicgen_error()


def build_model(config: Config) -> Stage1Model:
    """The stage-1 model exactly as a run of ``config`` trains it: created sharded under the
    active mesh (:func:`model_fn`), then filled from the configured checkpoints (:func:`init_fn`).
    The one constructor of training, resume, retrieval evaluation and export (call inside
    ``sharding.use_mesh``); trainable weights of a run are restored on top of it."""
    return init_fn(config)(sharding.create_sharded(model_fn(config)))


def init_musicgen(musicgen: nnx.Module | None, cfg: DataConfig, loaded: bool) -> None:
    """Codes mode: fills the frozen MusicGen from ``data.musicgen_checkpoint`` (both stages).
    Without one (and ``loaded`` False: no checkpoint gave it) it stays random only when
    ``data.random_musicgen`` says so, with a warning; otherwise a one-line ConfigError."""
    if musicgen is None:
        return
    if cfg.musicgen_checkpoint:
        path = _require_path(
            cfg.musicgen_checkpoint, "musicgen_checkpoint", "converted MusicGen", "data"
        )
        from bossa_jax.models.musicgen import load_musicgen

        source = restore_for(musicgen, load_musicgen, path, dtype=musicgen.cfg.dtype)
        write_params(musicgen, source, str(path))
        log.info("initialised MusicGen from %s", path)
    elif not loaded:
        if not cfg.random_musicgen:
            raise _no_musicgen_error()
        log.warning(
            "data.random_musicgen: MusicGen is randomly initialised (fine for smoke runs only)"
        )


def make_loss_fn(cfg: Stage1Config, *, train: bool = True) -> LossFn:
    """``loss_fn(model, batch, rng)`` of the step: the stage-1 losses ``stage1.losses`` (SPEC 3.6;
    all three by default); dropout only in training (``stage1.dropout``); ITM negatives drawn
    from the step's key."""
    deterministic = not (train and cfg.dropout)

    def loss_fn(model: Stage1Model, batch: Any, rng: jax.Array):
        return stage1_loss_fn(
            model,
            batch,
            rng,
            field_mean=cfg.field_mean,
            deterministic=deterministic,
            objectives=cfg.losses,
        )

    return loss_fn


def build_stage1_program(config: Config, mesh: Mesh) -> TrainProgram:
    """Builds the stage-1 model on ``mesh`` (:func:`build_model`), splits it by :data:`TRAINABLE`
    and builds AdamW with the official schedule (call inside ``sharding.use_mesh``)."""
    model = build_model(config)
    tx = make_optimizer(config.train.optim, config.train.total_steps)
    return build_program(
        model,
        TRAINABLE,
        make_loss_fn(config.stage1),
        tx,
        mesh,
        compute_dtype=jnp.dtype(config.train.compute_dtype),
    )


def batch_spec(config: Config, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global stage-1 batch (SPEC 6.5; the pipeline's layout)."""
    from bossa_jax.symbolic import octuple

    notes = octuple.MAX_NOTES
    frames = config.audio.clip_frames
    steps = config.audio.pattern_steps
    spec = {
        "notes": jax.ShapeDtypeStruct((global_batch, notes * 8), jnp.int32),
        "leadsheet_mask": jax.ShapeDtypeStruct((global_batch, notes), jnp.float32),
        "pad_mask": jax.ShapeDtypeStruct((global_batch, notes), jnp.float32),
        "audio_mask": jax.ShapeDtypeStruct((global_batch, steps), jnp.float32),
    }
    if config.data.audio_input == "codes":
        spec["codes"] = jax.ShapeDtypeStruct((global_batch, 4, frames), jnp.int32)
    else:
        width = config.qformer.encoder_width
        dtype = jnp.dtype(config.data.feature_dtype)
        spec["features"] = jax.ShapeDtypeStruct((global_batch, steps, width), dtype)
    return spec


@dataclasses.dataclass
class AbstractStep:
    """The stage-1 train step with abstract (shape, dtype, sharding) arguments: nothing is
    allocated, so a paper-size step can be lowered and compiled on any machine."""

    jitted: Any
    args: tuple[Any, ...]
    param_bytes: int
    opt_bytes: int
    frozen_bytes: int


def _sharded_abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def abstract_step(config: Config, mesh: Mesh, global_batch: int | None = None) -> AbstractStep:
    """The stage-1 step and abstract arguments for ``jitted.lower(*args).compile()`` (call inside
    ``sharding.use_mesh``); the byte counts are global (all shards)."""
    global_batch = global_batch or config.train.global_batch_size
    abstract_model = nnx.eval_shape(model_fn(config))
    graphdef, params, frozen = nnx.split(abstract_model, TRAINABLE, ...)
    param_sharding = sharding.named_shardings(params, mesh)
    frozen_sharding = sharding.named_shardings(frozen, mesh)
    params = _sharded_abstract(params, param_sharding)
    frozen = _sharded_abstract(frozen, frozen_sharding)
    tx = make_optimizer(config.train.optim, config.train.total_steps)
    opt_sharding = opt_state_shardings(tx, params, param_sharding, mesh)
    opt_state = _sharded_abstract(jax.eval_shape(tx.init, params), opt_sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(step, params, opt_state)
    state_sharding = TrainState(replicated, param_sharding, opt_sharding)
    batch = batch_spec(config, global_batch)
    b_sharding = batch_shardings(mesh, batch)
    batch = _sharded_abstract(batch, b_sharding)
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    jitted = make_train_step(
        graphdef,
        make_loss_fn(config.stage1),
        tx,
        state_sharding=state_sharding,
        frozen_sharding=frozen_sharding,
        batch_sharding=b_sharding,
        mesh=mesh,
        compute_dtype=jnp.dtype(config.train.compute_dtype),
    )
    return AbstractStep(
        jitted, (state, frozen, batch, rng), _bytes(params), _bytes(opt_state), _bytes(frozen)
    )


# --- data ---------------------------------------------------------------------------------------
def write_synthetic_corpus(root: str | Path, songs: int, bars: int) -> Path:
    """A generated POP909-layout corpus under ``root`` (songs, quiet audio, pseudo-EnCodec codes
    store and a split file: about a fifth of the songs each for validation and test, at least
    one). Idempotent: a complete corpus is left as it is."""
    root = Path(root)
    if (root / "codes" / fc.MANIFEST).is_file() and (root / SPLIT_FILE).is_file():
        return root
    names = synthetic.write_pop909_corpus(root, songs, bars=bars)
    held_out = max(1, math.ceil(songs / 5))
    split = {"pop909": {"validation": names[-2 * held_out : -held_out], "test": names[-held_out:]}}
    with atomic_output(root / SPLIT_FILE) as tmp:
        tmp.write_text(json.dumps(split))
    return root


def _require_path(value: str, key: str, what: str, section: str = "stage1") -> Path:
    if not value:
        raise ConfigError(f"config key '{section}.{key}': not set; give the {what}")
    path = Path(value)
    if not path.exists():
        raise DataError(f"config key '{section}.{key}': {path} not found ({what})")
    return path


def _sources(
    cfg: DataConfig, need_codes: bool = True
) -> tuple[list[readers.SongSource], Path | None, Path | None]:
    """(song sources, split file or None, codes store folder or None when not ``need_codes``)
    of the configured dataset."""
    if cfg.dataset == "synthetic":
        root = Path(cfg.data_dir) if cfg.data_dir else None
        if root is None:
            raise ConfigError("config key 'data.data_dir': not set; give the corpus folder")
        write_synthetic_corpus(root, cfg.synthetic_songs, cfg.synthetic_bars)
        sources = readers.pop909_sources(root / "pop909", root / "audio")
        return sources, root / SPLIT_FILE, root / "codes"
    data = _require_path(cfg.data_dir, "data_dir", f"{cfg.dataset} data", "data")
    audio = Path(cfg.audio_dir) if cfg.audio_dir else None
    if cfg.dataset == "pop909":
        sources = readers.pop909_sources(data, audio)
    elif cfg.dataset == "piast":
        sources = readers.piast_sources(data, audio)
    else:
        sources, _ = readers.manifest_sources(data, log)
    split_file = None
    if cfg.split_file:
        split_file = _require_path(cfg.split_file, "split_file", "split file", "data")
    if not need_codes:
        return sources, split_file, None
    codes = _require_path(cfg.codes_dir, "codes_dir", "per-song EnCodec codes store", "data")
    return sources, split_file, codes


def _feature_fn(config: Config) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(codes (b, 4, 508) -> features (b, 512, D), compute id) for building a feature cache."""
    cfg = config.data
    width = config.qformer.encoder_width
    if cfg.dataset == "synthetic" and not cfg.musicgen_checkpoint:
        return (lambda codes: synthetic.fake_features(codes, dim=width)), f"synthetic-{width}"
    path = _require_path(
        cfg.musicgen_checkpoint, "musicgen_checkpoint", "converted MusicGen", "data"
    )
    from bossa_jax.features import features_step
    from bossa_jax.models.musicgen import load_musicgen

    musicgen = load_musicgen(path, dtype=config.musicgen.dtype)
    graphdef, state = nnx.split(musicgen)

    def compute(codes: np.ndarray) -> np.ndarray:
        return np.asarray(features_step(graphdef, state, jnp.asarray(codes)))

    return compute, f"musicgen:{path.resolve()}:{config.musicgen.dtype}"


@dataclasses.dataclass
class Stage1Split:
    """One split of the corpus, ready for pipelines: its index and where its audio comes from."""

    split: str
    index: pl.CorpusIndex
    audio: pl.AudioSource

    @property
    def usable(self) -> list[int]:
        """Example ids whose lead sheet fits the stage-1 sequence (SPEC 11.11)."""
        return self.usable_in(1)

    def usable_in(self, stage: int) -> list[int]:
        """Example ids whose lead sheet fits the sequence of ``stage`` (SPEC 11.11)."""
        return [e.example_id for e in self.index.examples if pl.fits_stage(e.window, stage)]


def check_fills_batch(
    data: Stage1Split, global_batch: int, stage: int = 1, section: str = "train"
) -> None:
    """Evaluation needs one full global batch of usable windows: else a one-line DataError."""
    n = len(data.usable_in(stage))
    if n < global_batch:
        raise DataError(
            f"the {data.split} split has {n} usable windows, fewer than one global batch "
            f"({global_batch}); set {section}.eval_every=0 or add songs"
        )


def refuse_before_data(
    run_config: Config, mesh: Mesh | None, *, section: str, resume: bool, overwrite: bool
) -> Mesh:
    """What a stage's run refuses before any data is read: a global batch the mesh cannot split
    (named in ``section``, the stage's train section) and a run folder that needs --resume or
    --overwrite. Returns the mesh (made from ``run_config.mesh`` when None)."""
    mesh = sharding.make_mesh(run_config.mesh) if mesh is None else mesh
    with sharding.use_mesh(mesh, sharding.rules_of(run_config.mesh)):
        try:
            loop.check_batch_divides(run_config.train.global_batch_size, mesh)
        except ConfigError as err:  # the loop names its own section: name the stage's
            raise ConfigError(str(err).replace("'train.", f"'{section}.", 1)) from err
    loop.check_run_dir(run_config.train.out_dir, resume=resume, overwrite=overwrite)
    return mesh


def load_train_and_validation(
    run_config: Config, *, eval_batches: int, stage: int, section: str
) -> tuple[Stage1Split, Stage1Split | None]:
    """The train split and, when the run evaluates, the validation split (which must fill one
    global batch of windows usable in ``stage``)."""
    train_split = load_split(run_config, "train")
    if run_config.train.eval_every <= 0 or eval_batches <= 0:
        return train_split, None
    validation = load_split(run_config, "validation")
    check_fills_batch(validation, run_config.train.global_batch_size, stage, section)
    return train_split, validation


def load_split(config: Config, split: str) -> Stage1Split:
    """Reads the songs of ``split``, their codes, the window index and the audio source (features
    mode: the split's feature cache, built on first use)."""
    cfg = config.data
    if config.audio.frontend == "mel":
        return _load_mel_split(config, split)
    sources, split_file, codes_dir = _sources(cfg)
    records, _ = readers.read_songs(
        sources, split=split, split_file=split_file, require_audio=False, logger=log
    )
    codes = fc.CodesStore(codes_dir)
    missing = [r.id for r in records if r.id not in codes]
    if missing:
        log.warning("%d %s songs have no codes in %s; left out", len(missing), split, codes_dir)
        records = [r for r in records if r.id in codes]
    if not records:
        raise DataError(f"no readable songs with codes in the {split!r} split of {cfg.data_dir}")
    index = pl.build_index(
        records, codes, clamp=cfg.clamp_clips, clip_length=config.audio.clip_frames
    )
    if cfg.audio_input == "codes":
        return Stage1Split(split, index, pl.AudioSource(index, codes=codes))
    cache_root = _cache_root(config, split, f"features-{config.qformer.encoder_width}")
    cache = _existing_cache(config, cache_root)
    if cache is None:
        compute, compute_id = _feature_fn(config)
        cache = fc.build_feature_cache(
            cache_root, index.clips, codes.codes, compute, compute_id=compute_id,
            dtype=cfg.feature_dtype, progress=False,
        )  # fmt: skip
    return Stage1Split(split, index, pl.AudioSource(index, features=cache))


def _cache_root(config: Config, split: str, synthetic_name: str) -> Path:
    cfg = config.data
    if cfg.feature_cache_dir:
        return Path(cfg.feature_cache_dir) / split
    if cfg.dataset == "synthetic":
        return Path(cfg.data_dir) / synthetic_name / split
    raise ConfigError(
        "config key 'data.feature_cache_dir': not set; audio_input=features needs a cache"
    )


def _existing_cache(config: Config, cache_root: Path) -> fc.FeatureCache | None:
    """The feature cache at ``cache_root`` if one is there (its dtype must be the config's)."""
    if not (cache_root / fc.MANIFEST).is_file():
        return None
    cache = fc.FeatureCache(cache_root)
    if cache.dtype != np.dtype(fc.dtype_of(config.data.feature_dtype)):
        raise ConfigError(
            f"config key 'data.feature_dtype': {config.data.feature_dtype}, but the feature "
            f"cache {cache_root} stores {cache.dtype}; set the key to match or use another folder"
        )
    return cache


def _load_mel_split(config: Config, split: str) -> Stage1Split:
    """:func:`load_split` for ``audio.frontend=mel``: no codes store; the window index counts the
    audio's 50 Hz frames and the feature cache holds log-mel frames of the same clips
    (bossa_jax.mel), computed from the songs' audio files on first use."""
    from bossa_jax import mel

    cfg = config.data
    sources, split_file, _ = _sources(cfg, need_codes=False)
    records, _ = readers.read_songs(
        sources, split=split, split_file=split_file, require_audio=True, logger=log
    )
    if not records:
        raise DataError(f"no readable songs with audio in the {split!r} split of {cfg.data_dir}")
    sample_rate = config.encodec.sampling_rate
    frames = {r.id: mel.audio_frames(r.audio, sample_rate) for r in records}
    index = pl.build_index(
        records, frames, clamp=cfg.clamp_clips, clip_length=config.audio.clip_frames
    )
    cache_root = _cache_root(config, split, f"features-mel-{config.audio.n_mels}")
    cache = _existing_cache(config, cache_root)
    if cache is None:
        audio_of = {r.id: r.audio for r in records}.__getitem__
        cache = fc.build_clip_feature_cache(
            cache_root, index.clips, mel.clips_fn(config, audio_of),
            compute_id=mel.compute_id(config), dtype=cfg.feature_dtype, progress=False,
        )  # fmt: skip
    return Stage1Split(split, index, pl.AudioSource(index, features=cache))


class ModelFields:
    """A pipeline iterator that yields only the fields the step consumes (grain's state kept)."""

    def __init__(self, iterator: Any, keys: tuple[str, ...]):
        self.iterator, self.keys = iterator, keys

    def __iter__(self) -> ModelFields:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.fields(next(self.iterator))

    def fields(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step's fields of one pipeline batch (subclasses add derived ones)."""
        return {k: batch[k] for k in self.keys}

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)


def make_pipeline(
    config: Config,
    data: Stage1Split,
    process_index: int,
    process_count: int,
    *,
    train: bool = True,
    global_batch: int | None = None,
    stage: int = 1,
) -> pl.Pipeline:
    """This process's pipeline of ``stage`` over ``data``: training repeats forever with the
    run's seed; evaluation reads one epoch with a fixed seed. The global batch defaults to
    ``config.train``'s (stage 2 passes a config whose ``train`` is ``stage2.train``)."""
    cfg = config.data
    options = pl.PipelineOptions(
        stage=stage,
        global_batch_size=global_batch or config.train.global_batch_size,
        seed=config.train.seed if train else 0,
        num_epochs=None if train else 1,
        transpose=cfg.transpose,  # the official validation transposes too (SPEC 10.6)
        deperf=cfg.deperf,
        keep_eos=cfg.keep_eos,
        max_tokens=config.stage2.max_tokens,
        process_index=process_index,
        process_count=process_count,
        num_threads=cfg.num_threads,
        prefetch_buffer_size=cfg.prefetch,
    )
    return pl.Pipeline(data.index, data.audio, options)


def train_data(config: Config, data: Stage1Split, stage: int = 1) -> loop.DataFactory:
    keys = model_keys(config.data, stage)

    def factory(process_index: int, process_count: int) -> ModelFields:
        pipe = make_pipeline(config, data, process_index, process_count, stage=stage)
        return ModelFields(pipe.iterator(), keys)

    return factory


def eval_data(
    config: Config, data: Stage1Split, stage: int = 1, eval_batches: int | None = None
) -> loop.EvalFactory:
    keys = model_keys(config.data, stage)
    eval_batches = config.stage1.eval_batches if eval_batches is None else eval_batches

    def factory(process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
        pipe = make_pipeline(config, data, process_index, process_count, train=False, stage=stage)
        batches = min(eval_batches, pipe.steps_per_epoch)
        iterator = ModelFields(pipe.iterator(), keys)
        return (next(iterator) for _ in range(batches))

    return factory


# --- export -------------------------------------------------------------------------------------
def export(
    config: Config, run_dir: str | Path, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Writes the model of a stage-1 run (``config`` = the run's config; the latest checkpoint's
    trainable weights on the model :func:`build_model` makes, so with the frozen MusicGen the run
    trained with) as a stage-1 checkpoint (``save_stage1``: what ``stage1.init_from`` and stage 2
    read; SPEC 7). ``out`` is checked before any work (bossa_jax.outputs; ``overwrite`` replaces
    a previous stage-1 checkpoint there)."""
    from bossa_jax.outputs import check_output
    from bossa_jax.train import evaluate

    if not loop.checkpoint_steps(run_dir):
        raise CheckpointError(f"{run_dir}: not a stage-1 run (no checkpoints/ with a step in it)")
    sources = [Path(run_dir) / loop.CHECKPOINT_DIR]
    check_output(out, CHECKPOINT_KIND, folder=True, overwrite=overwrite, sources=sources)
    model = evaluate.load_model(config, run_dir)
    return save_stage1(out, model, overwrite=overwrite)


# --- the run ------------------------------------------------------------------------------------
def run(
    config: Config, *, resume: bool = False, overwrite: bool = False, mesh: Mesh | None = None
) -> loop.TrainResult:
    """Stage-1 training with the generic loop (logging, eval on the validation split, orbax
    checkpoints, resume / overwrite, SIGTERM/SIGINT, non-finite stop: see
    :mod:`bossa_jax.train.loop`)."""
    mesh = refuse_before_data(config, mesh, section="train", resume=resume, overwrite=overwrite)
    check_musicgen_source(config)
    train_split, validation = load_train_and_validation(
        config, eval_batches=config.stage1.eval_batches, stage=1, section="train"
    )
    return loop.train(
        config,
        model_fn=functools.partial(build_model, config),
        trainable=TRAINABLE,
        loss_fn=make_loss_fn(config.stage1),
        train_data=train_data(config, train_split),
        eval_data=eval_data(config, validation) if validation is not None else None,
        eval_loss_fn=make_loss_fn(config.stage1, train=False),
        resume=resume,
        overwrite=overwrite,
        mesh=mesh,
    )
