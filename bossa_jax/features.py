"""Audio files -> EnCodec codes -> MusicGen features, for one file or thousands (SPEC 1.1-1.3;
DESIGN "The data flow", "Sharding is declared next to the parameters").

For each input the 508-frame clip is chosen by :func:`bossa_jax.audio.load_clip` (centred on the
middle of the file, clamped into it), encoded to codes (4, 508) (right-padded with 2048 and masked
when the file is shorter, :func:`~bossa_jax.audio.pad_codes` / :func:`~bossa_jax.audio.clip_mask`),
and run through the truncated MusicGen (features (512, d), d = 2048 at paper size). A ``.npy``
input holds precomputed codes (4, T) and skips EnCodec; its clip is chosen the same way.

Batches have one fixed size (the last one is padded with silent or all-pad rows and the padding is
dropped), so each jitted step compiles once. Batches are sharded over the mesh's batch axes, and
the parameters are placed with the logical-axis rules of ``mesh`` (the same code runs on one CPU,
8 GPUs or a TPU slice). A short file's audio is zero-padded to the clip length before EnCodec, so
its last valid frame or two may differ from encoding the exact length (EnCodec reflect-pads at the
end); those frames are still marked valid, as in the official pipeline where clips are cut from
whole-song codes.

Every bad input raises a BossaError naming the file. All inputs are checked (headers, code arrays)
before any model work; a file found silent while decoding stops the run. Outputs are written
atomically: nothing is left behind on failure.

Command::

    python -m bossa_jax.features AUDIO_OR_NPY... --out feats.npz --musicgen CKPT \\
        [--encodec CKPT] [--config configs/paper.yaml] [--batch-size 8] [--overwrite]
        [key=value ...]

With ``audio.frontend=mel`` (bossa_jax.mel) no checkpoint is needed: the features are frozen
log-mel frames (512, audio.n_mels) of audio inputs, and the codes arrays are empty (n, 0, 508).

``--out`` ending in ``.npz`` writes one archive (``codes``, ``features``, ``masks``, ``files``);
any other path becomes a directory with ``codes.npy``, ``features.npy`` (written as it goes, so
large runs never hold all features in memory), ``masks.npy`` and ``files.txt``. The output is
checked before any work (bossa_jax.outputs): an existing one is replaced only with ``--overwrite``
and a folder the command did not write never is.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bossa_jax import audio, sharding
from bossa_jax.cli import ArgumentParser, add_output_options
from bossa_jax.config import Config, load_config
from bossa_jax.errors import ConfigError, DataError, run_cli
from bossa_jax.models.musicgen import MusicgenFeatures, apply_features, load_musicgen
from bossa_jax.outputs import atomic_output, check_output

CODES_SUFFIX = ".npy"
OUTPUT_KIND = "features"


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of results; rows ``start .. start + len(files)``."""

    start: int
    files: list[str]
    codes: np.ndarray  # (n, 4, clip_frames) int32, padded with the special id
    features: np.ndarray  # (n, clip_frames + 4, d) float32
    masks: np.ndarray  # (n, clip_frames + 4) float32, 1 = valid


@dataclasses.dataclass(frozen=True)
class _Item:
    samples: np.ndarray | None  # (clip_samples,) zero-padded, for audio inputs
    codes: np.ndarray | None  # (4, clip_frames) padded, for code inputs
    valid_frames: int


def is_archive(out: str | os.PathLike) -> bool:
    """Whether ``--out`` names one .npz archive (else a folder of .npy files)."""
    return Path(out).suffix.lower() == ".npz"


def is_codes_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == CODES_SUFFIX


def load_codes(
    path: str | os.PathLike,
    *,
    num_codebooks: int,
    special_id: int,
    clip_frames: int,
    min_frames: int,
) -> tuple[np.ndarray, int]:
    """Precomputed EnCodec codes (num_codebooks, T) -> (clip (num_codebooks, clip_frames) padded
    with ``special_id``, valid frames); the clip is chosen like :func:`audio.load_clip`'s."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: codes file not found")
    try:
        codes = np.load(file, allow_pickle=False)
    except Exception as err:  # numpy raises ValueError/OSError/EOFError/UnpicklingError
        raise DataError(f"{file}: not a readable .npy array ({type(err).__name__})") from err
    if (
        codes.ndim != 2
        or codes.shape[0] != num_codebooks
        or not np.issubdtype(codes.dtype, np.integer)
    ):
        raise DataError(
            f"{file}: expected integer EnCodec codes ({num_codebooks}, frames), "
            f"got {codes.dtype} {codes.shape}"
        )
    if codes.shape[1] < min_frames:
        raise DataError(f"{file}: {codes.shape[1]} frames of codes; at least {min_frames} needed")
    if codes.size and (codes.min() < 0 or codes.max() >= special_id):
        raise DataError(
            f"{file}: codes must be in [0, {special_id - 1}], found {codes.min()}..{codes.max()}"
        )
    total = codes.shape[1]
    start, valid = audio.clip_placement(total // 2, total, clip_frames)
    clip = codes[:, start : start + valid].astype(np.int32)
    return audio.pad_codes(clip, clip_frames, special_id), clip.shape[1]


def _check_input(path: str, cfg: Config, decode: bool) -> None:
    """Validation before any model work: the whole array for codes; for audio the header, or with
    ``decode`` the clip window too (:func:`audio.check_audio`: silence, non-finite samples)."""
    if is_codes_file(path):
        _load_codes_item(path, cfg)
    elif decode:
        audio.check_audio(
            path, sample_rate=cfg.encodec.sampling_rate, clip_frames=cfg.audio.clip_frames
        )
    else:
        audio.audio_duration(path)


def _min_frames(cfg: Config) -> int:
    return max(1, math.ceil(cfg.audio.min_seconds * cfg.encodec.frame_rate))


def _load_codes_item(path: str, cfg: Config) -> _Item:
    codes, valid = load_codes(
        path,
        num_codebooks=cfg.musicgen.num_codebooks,
        special_id=cfg.musicgen.special_id,
        clip_frames=cfg.audio.clip_frames,
        min_frames=_min_frames(cfg),
    )
    return _Item(samples=None, codes=codes, valid_frames=valid)


def _load_item(path: str, cfg: Config) -> _Item:
    if is_codes_file(path):
        return _load_codes_item(path, cfg)
    clip = audio.load_clip(
        path, sample_rate=cfg.encodec.sampling_rate, clip_frames=cfg.audio.clip_frames
    )
    samples = np.zeros(cfg.audio.clip_frames * cfg.encodec.hop_length, np.float32)
    samples[: clip.samples.size] = clip.samples
    return _Item(samples=samples, codes=None, valid_frames=clip.valid_frames)


# Module-level jits with the graph definitions static: one compile per model structure, input
# shape and sharding, shared by every extractor in the process.
@functools.partial(jax.jit, static_argnums=(0, 4))
def encode_step(
    graphdef: nnx.GraphDef, state: nnx.State, samples: jax.Array, valid: jax.Array, pad_id: int
) -> jax.Array:
    """(B, clip_samples) -> codes (B, 4, clip_frames), frames past ``valid`` set to ``pad_id``."""
    codes = nnx.merge(graphdef, state).encode(samples)
    frames = jnp.arange(codes.shape[-1])
    return jnp.where(frames[None, None, :] < valid[:, None, None], codes, pad_id).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def features_step(graphdef: nnx.GraphDef, state: nnx.State, codes: jax.Array) -> jax.Array:
    """Codes (B, 4, clip_frames) -> float32 features (B, clip_frames + 4, d)."""
    return apply_features(graphdef, state, codes).astype(jnp.float32)


def place(module: nnx.Module, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Splits ``module`` and puts its state on ``mesh`` as the active rules declare (call inside
    :func:`sharding.use_mesh`)."""
    graphdef, state = nnx.split(module)
    return graphdef, jax.device_put(state, sharding.named_shardings(state, mesh))


def check_inputs(
    paths: Sequence[str], cfg: Config, *, has_encodec: bool, decode: bool = False
) -> None:
    """Validates every input (headers, code arrays; with ``decode`` also each audio clip's
    samples, on a few threads); audio needs an EnCodec model. The first bad input raises."""
    for path in paths:
        if not is_codes_file(path) and not has_encodec:
            raise ConfigError(f"{path}: audio input needs an EnCodec checkpoint (--encodec)")
    check = functools.partial(_check_input, cfg=cfg, decode=decode)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(check, paths):  # results in input order: the first bad file raises
            pass


class FeatureExtractor:
    """Fixed-shape, jitted, batch-sharded EnCodec + MusicGen feature extraction.

    ``musicgen`` and ``encodec`` (None: codes inputs only) are placed on ``mesh`` (default: the
    config's mesh over all devices) with the config's rules. ``batch_size`` is global and must be
    a multiple of the mesh's batch axes (data x fsdp).
    """

    def __init__(
        self,
        cfg: Config,
        musicgen: MusicgenFeatures,
        encodec: nnx.Module | None = None,
        *,
        batch_size: int = 8,
        mesh: Mesh | None = None,
    ):
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
        self.rules = sharding.rules_of(cfg.mesh)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if batch_size < 1 or batch_size % batch_devices:
            raise ConfigError(
                f"batch size {batch_size} must be a positive multiple of the mesh's batch axes "
                f"(data x fsdp = {batch_devices}); change --batch-size or mesh.shape"
            )
        if musicgen.cfg.num_codebooks != cfg.musicgen.num_codebooks:
            raise ConfigError("config key 'musicgen.num_codebooks' does not match the checkpoint")
        self.batch_size = batch_size
        self.clip_frames = cfg.audio.clip_frames
        self.clip_samples = cfg.audio.clip_frames * cfg.encodec.hop_length
        self.num_codebooks = musicgen.cfg.num_codebooks
        self.special_id = musicgen.cfg.special_id
        with self._context():
            self.musicgen_graphdef, self.musicgen_state = place(musicgen, self.mesh)
            self.encodec_graphdef = self.encodec_state = None
            if encodec is not None:
                self.encodec_graphdef, self.encodec_state = place(encodec, self.mesh)
            self._rows = {n: sharding.batch_sharding(self.mesh, n) for n in (1, 2, 3)}

    def _context(self):
        return sharding.use_mesh(self.mesh, self.rules)

    def check(self, paths: Sequence[str]) -> None:
        """Validates every input (headers, code arrays) before any model work."""
        check_inputs(paths, self.cfg, has_encodec=self.encodec_state is not None)

    def run_batch(self, items: Sequence[_Item]) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``batch_size`` loaded items -> (codes, features) for those rows."""
        n, b = len(items), self.batch_size
        codes = np.full((b, self.num_codebooks, self.clip_frames), self.special_id, np.int32)
        with self._context():
            audio_rows = [i for i, item in enumerate(items) if item.samples is not None]
            if audio_rows:
                samples = np.zeros((b, self.clip_samples), np.float32)
                valid = np.zeros((b,), np.int32)
                for i in audio_rows:
                    samples[i] = items[i].samples
                    valid[i] = items[i].valid_frames
                encoded = encode_step(
                    self.encodec_graphdef,
                    self.encodec_state,
                    jax.device_put(samples, self._rows[2]),
                    jax.device_put(valid, self._rows[1]),
                    self.special_id,
                )
                codes[audio_rows] = np.asarray(encoded)[audio_rows]
            for i, item in enumerate(items):
                if item.codes is not None:
                    codes[i] = item.codes
            features = features_step(
                self.musicgen_graphdef, self.musicgen_state, jax.device_put(codes, self._rows[3])
            )
            features = np.asarray(features)
        return codes[:n], features[:n]

    def iter_batches(
        self, paths: Sequence[str], *, progress: bool = True, workers: int = 2
    ) -> Iterator[Batch]:
        """Checks all inputs, then yields results batch by batch (decoding the next batch on
        ``workers`` threads while the current one computes)."""
        paths = [str(p) for p in paths]
        self.check(paths)
        from tqdm import tqdm

        groups = [paths[i : i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        bar = tqdm(total=len(paths), unit="clip", disable=None if progress else True)
        load = functools.partial(_load_item, cfg=self.cfg)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = [pool.submit(load, p) for p in groups[0]] if groups else []
            for index, group in enumerate(groups):
                items = [f.result() for f in pending]
                if index + 1 < len(groups):
                    pending = [pool.submit(load, p) for p in groups[index + 1]]
                codes, features = self.run_batch(items)
                masks = np.stack(
                    [audio.clip_mask(it.valid_frames, self.clip_frames) for it in items]
                )
                bar.update(len(group))
                yield Batch(index * self.batch_size, group, codes, features, masks)
        bar.close()


def extract_features(
    paths: Sequence[str | os.PathLike],
    extractor: FeatureExtractor,
    *,
    progress: bool = False,
) -> Batch:
    """All results in memory: codes (N, 4, 508), features (N, 512, d), masks (N, 512)."""
    batches = list(extractor.iter_batches([str(p) for p in paths], progress=progress))
    if not batches:
        raise DataError("no input files given")
    return Batch(
        0,
        [f for b in batches for f in b.files],
        np.concatenate([b.codes for b in batches]),
        np.concatenate([b.features for b in batches]),
        np.concatenate([b.masks for b in batches]),
    )


def write_features(
    out: str | os.PathLike,
    paths: Sequence[str],
    extractor: FeatureExtractor,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Runs ``extractor`` over ``paths`` and writes ``out`` atomically (.npz archive or a
    directory of .npy files, see the module docstring); ``overwrite`` replaces a previous one."""
    out = Path(out)
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError("no input files given")
    if is_archive(out):
        result = extract_features(paths, extractor, progress=progress)
        with atomic_output(out, kind=OUTPUT_KIND, overwrite=overwrite) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    codes=result.codes,
                    features=result.features,
                    masks=result.masks,
                    files=np.asarray(result.files),
                )
        return out
    n = len(paths)
    steps = extractor.clip_frames + 4
    with atomic_output(out, kind=OUTPUT_KIND, overwrite=overwrite) as tmp:
        tmp.mkdir()
        codes = np.full((n, extractor.num_codebooks, extractor.clip_frames), 0, np.int32)
        masks = np.zeros((n, steps), np.float32)
        features = None
        for batch in extractor.iter_batches(paths, progress=progress):
            rows = slice(batch.start, batch.start + len(batch.files))
            if features is None:  # the width is known after the first batch
                features = np.lib.format.open_memmap(
                    tmp / "features.npy", mode="w+", dtype=np.float32,
                    shape=(n, steps, batch.features.shape[-1]),
                )  # fmt: skip
            features[rows] = batch.features
            codes[rows] = batch.codes
            masks[rows] = batch.masks
        features.flush()
        del features
        np.save(tmp / "codes.npy", codes)
        np.save(tmp / "masks.npy", masks)
        (tmp / "files.txt").write_text("".join(f"{p}\n" for p in paths))
    return out


def build_extractor(
    cfg: Config,
    *,
    musicgen_path: str | os.PathLike,
    encodec_path: str | os.PathLike | None,
    batch_size: int,
    mesh: Mesh | None = None,
) -> FeatureExtractor:
    """Loads checkpoints written by ``convert.musicgen`` and ``convert.encodec``."""
    musicgen = load_musicgen(
        musicgen_path, dtype=cfg.musicgen.dtype, keep_layers=cfg.musicgen.keep_layers
    )
    encodec = None
    if encodec_path is not None:
        from bossa_jax.models.encodec import load_encodec

        encodec = load_encodec(encodec_path)
    return FeatureExtractor(cfg, musicgen, encodec, batch_size=batch_size, mesh=mesh)


def random_extractor(cfg: Config, *, seed: int, batch_size: int) -> FeatureExtractor:
    """An extractor with randomly initialised EnCodec and MusicGen of the config's sizes."""
    from bossa_jax.models.encodec import EncodecEncoder

    # the Rngs live inside the traced constructors (they are mutated during init)
    musicgen = sharding.create_sharded(lambda: MusicgenFeatures(cfg.musicgen, rngs=nnx.Rngs(seed)))
    encodec = sharding.create_sharded(lambda: EncodecEncoder(cfg.encodec, rngs=nnx.Rngs(seed + 1)))
    return FeatureExtractor(cfg, musicgen, encodec, batch_size=batch_size)


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m bossa_jax.features",
        description="Audio files (or EnCodec codes .npy) -> MusicGen features (SPEC 1.1-1.3).",
    )
    parser.add_argument("inputs", nargs="+", help="audio files, .npy code arrays, key=value")
    parser.add_argument("--out", required=True, help="output .npz file or directory")
    parser.add_argument("--musicgen", default=None, help="checkpoint from convert.musicgen")
    parser.add_argument(
        "--random-init", type=int, default=None, metavar="SEED",
        help="random weights from the config instead of checkpoints (smoke tests only)",
    )  # fmt: skip
    parser.add_argument("--encodec", default=None, help="checkpoint from convert.encodec")
    parser.add_argument("--config", default=None, help="config YAML (e.g. configs/paper.yaml)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-progress", action="store_true")
    add_output_options(parser)
    args = parser.parse_args(argv)
    overrides = [a for a in args.inputs if "=" in a and not Path(a).exists()]
    paths = [a for a in args.inputs if a not in overrides]
    sources = [*paths, *(p for p in (args.musicgen, args.encodec, args.config) if p is not None)]
    check_output(
        args.out, OUTPUT_KIND, folder=not is_archive(args.out), overwrite=args.overwrite,
        sources=sources,
    )  # fmt: skip
    cfg = load_config(args.config, overrides)
    if not paths:
        raise DataError("no input files given")
    random_init = args.random_init is not None
    if cfg.audio.frontend == "mel":  # frozen log-mel frames, no checkpoint (bossa_jax.mel)
        from bossa_jax.mel import MelExtractor

        extractor = MelExtractor(cfg, batch_size=args.batch_size)
        extractor.check(paths)
    elif not random_init and args.musicgen is None:
        raise ConfigError("give --musicgen CHECKPOINT (or --random-init SEED for a smoke test)")
    else:
        # check inputs (decoding each clip: silence too) before loading checkpoints
        check_inputs(paths, cfg, has_encodec=args.encodec is not None or random_init, decode=True)
        if random_init:
            print(f"random weights (seed {args.random_init}): features are for smoke tests only")
            extractor = random_extractor(cfg, seed=args.random_init, batch_size=args.batch_size)
        else:
            extractor = build_extractor(
                cfg, musicgen_path=args.musicgen, encodec_path=args.encodec,
                batch_size=args.batch_size,
            )  # fmt: skip
    out = write_features(
        args.out, paths, extractor, progress=not args.no_progress, overwrite=args.overwrite
    )
    print(f"wrote {out}: {len(paths)} clips")
    return 0


if __name__ == "__main__":
    run_cli(main)
