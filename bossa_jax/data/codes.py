"""Per-song EnCodec codes store from a corpus's audio (DESIGN "Layout": data/; SPEC 1.1).

``python -m bossa_jax.data.codes --config CFG --encodec CKPT --dataset pop909|piast|manifest
--data-dir D [--audio-dir A] --out DIR`` reads the corpus with :mod:`bossa_jax.data.readers`,
decodes each song's whole audio (mono, resampled to 32 kHz by :func:`bossa_jax.audio.load_clip`)
and encodes it with the converted EnCodec (``python -m convert.encodec``) into a codes store
(:func:`bossa_jax.data.feature_cache.build_codes_store`: resumable, an interrupted run continues
where it stopped). Flags left out come from the config's ``data`` section. ``--out`` must be new,
an empty folder or a codes store (checked before any work); ``--verbose`` shows the libraries' log
messages (orbax, absl), which are otherwise kept off the terminal.

Songs are encoded in fixed chunks of ``--chunk-seconds`` (default 30 s; the last one zero-padded)
so one compiled encode shape serves every song. EnCodec's convolutions and LSTM see across a chunk
boundary in whole-file encoding, so codes near each boundary (and the frames of the zero-padded
tail) can differ from encoding the whole file at once: measured on a tiny random EnCodec, only
frames within 6 (120 ms) of a boundary differ (tests/data/test_codes.py; the real EnCodec, with
its 2-layer LSTM, is not measured there). With 30 s chunks that is at most 12 of every 1500
frames. Each song has ``ceil(samples / 640)`` frames.

A first pass decodes every song's audio and skips (with a count) the missing, undecodable, too
short or silent ones, so one bad file never stops the store. PIAST audio is shifted onto its MIDI
before encoding, as the official preprocessing does (:mod:`bossa_jax.data.align`, SPEC 1.1); the
shift of each song is kept in the store (``CodesStore.metadata``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bossa_jax import audio
from bossa_jax.cli import ArgumentParser, setup_logging
from bossa_jax.config import load_config
from bossa_jax.data import align, readers
from bossa_jax.data import feature_cache as fc
from bossa_jax.errors import AudioError, ConfigError, MidiError, OutputError, run_cli
from bossa_jax.outputs import check_location

log = logging.getLogger("bossa_jax.data")

WHOLE_FILE = 2**40  # clip_frames larger than any file: load_clip returns the whole file
DEFAULT_CHUNK_SECONDS = 30.0
MAX_CHUNK_SECONDS = 600.0  # longer songs take more chunks; one chunk's activations stay small


def load_whole(path: str | Path) -> np.ndarray:
    """The whole file as mono float32 at 32 kHz (load_clip's decoding and checks)."""
    return audio.load_clip(path, clip_frames=WHOLE_FILE).samples


def chunked_encoder(
    encode: Callable[[np.ndarray], np.ndarray], chunk_samples: int, hop: int = 640
) -> Callable[[np.ndarray], np.ndarray]:
    """``samples -> codes (K, ceil(samples / hop))`` by encoding ``(1, chunk_samples)`` chunks
    (the last one zero-padded) with ``encode`` and concatenating the frames."""
    if chunk_samples <= 0 or chunk_samples % hop:
        raise ValueError(f"chunk_samples must be a positive multiple of {hop}: {chunk_samples}")

    def run(samples: np.ndarray) -> np.ndarray:
        frames = -(-samples.size // hop)
        chunks = max(1, math.ceil(samples.size / chunk_samples))
        padded = np.zeros(chunks * chunk_samples, np.float32)
        padded[: samples.size] = samples
        codes = [
            np.asarray(encode(padded[i * chunk_samples : (i + 1) * chunk_samples][None]))[0]
            for i in range(chunks)
        ]
        return np.concatenate(codes, axis=-1)[:, :frames]

    return run


def encodec_encoder(checkpoint: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(``(1, samples) -> codes (1, K, frames)`` with the converted EnCodec, compute id)."""
    from bossa_jax.models.encodec import encode_fn, load_encodec

    model = load_encodec(checkpoint)
    graphdef, state = nnx.split(model)

    def encode(batch: np.ndarray) -> np.ndarray:
        return np.asarray(encode_fn(graphdef, state, jnp.asarray(batch)))

    return encode, f"encodec:{Path(checkpoint).resolve()}"


def song_sources(dataset: str, data_dir: str, audio_dir: str) -> list[readers.SongSource]:
    if not data_dir:
        raise ConfigError("--data-dir (config key 'data.data_dir'): not set")
    audio_root = audio_dir or None
    if dataset == "pop909":
        return readers.pop909_sources(data_dir, audio_root)
    if dataset == "piast":
        return readers.piast_sources(data_dir, audio_root)
    if dataset == "manifest":
        return readers.manifest_sources(data_dir, log)[0]
    raise ConfigError(f"--dataset: must be pop909, piast or manifest, got {dataset!r}")


def piast_shift(audio_path: Path, samples: np.ndarray, midi: Path) -> float:
    """The onset-alignment shift (seconds) of a PIAST song's 32 kHz audio (SPEC 1.1)."""
    first_note = readers.piast_first_note_seconds(midi)
    try:
        return align.align_to_midi(samples, audio.SAMPLE_RATE, first_note)[1]
    except AudioError as err:
        raise AudioError(f"{audio_path}: {err}") from err


def build_from_audio(
    out: str | Path,
    sources: Sequence[readers.SongSource],
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    compute_id: str,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    progress: bool = True,
) -> tuple[fc.CodesStore, int]:
    """(the codes store of every readable song with usable audio, how many were skipped).

    PIAST songs are aligned first (:func:`bossa_jax.data.align.align_to_midi`, SPEC 1.1): the
    waveform is shifted so its first onset meets the first note of MIDI track 0, and the shift
    (seconds, positive = the audio started late) is stored per song
    (``CodesStore.metadata(song_id)["audio_shift_seconds"]``)."""
    chunk_samples = round(chunk_seconds * audio.FRAME_RATE) * (
        audio.SAMPLE_RATE // audio.FRAME_RATE
    )
    records, _ = readers.read_songs(sources, require_audio=True, logger=log)
    piast_midi = {s.id: s.midi for s in sources if s.layout == "piast"}
    songs, skipped = [], len(sources) - len(records)
    for record in records:
        try:
            samples = load_whole(record.audio)
            shift = None
            if record.id in piast_midi:
                shift = piast_shift(record.audio, samples, piast_midi[record.id])
                log.info("%s: audio shifted %+.3f s onto the MIDI", record.id, shift)
        except (AudioError, MidiError) as err:
            log.warning("skipped: %s", err)
            skipped += 1
            continue
        songs.append((record.id, (record.audio, shift)))
    if not songs:
        raise AudioError(f"no song with usable audio among {len(sources)} songs")
    encode_song = chunked_encoder(encode, chunk_samples)

    def encode_aligned(item: tuple[Path, float | None]) -> dict[str, np.ndarray]:
        path, shift = item
        if shift is None:
            return {"codes": encode_song(load_whole(path))}
        samples = align.shift_waveform(load_whole(path), audio.SAMPLE_RATE, shift)
        return {"codes": encode_song(samples), "audio_shift_seconds": np.float64(shift)}

    aligned = ":piast-onset-aligned" if piast_midi else ""
    store = fc.build_codes_store(
        out,
        songs,
        encode_aligned,
        compute_id=f"{compute_id}:chunk{chunk_samples}{aligned}",
        progress=progress,
    )
    return store, skipped


def check_chunk_seconds(seconds: float) -> None:
    """One EnCodec frame (1/50 s) up to MAX_CHUNK_SECONDS."""
    if not (math.isfinite(seconds) and 1 <= round(seconds * audio.FRAME_RATE)):
        raise ConfigError(
            f"--chunk-seconds: must be at least one EnCodec frame ({1 / audio.FRAME_RATE} s), "
            f"got {seconds}"
        )
    if seconds > MAX_CHUNK_SECONDS:
        raise ConfigError(f"--chunk-seconds: at most {MAX_CHUNK_SECONDS:g} s, got {seconds}")


def check_store_output(out: str | Path, sources: Sequence[str]) -> None:
    """``out`` must be new, an empty folder or a codes store to resume, never another folder."""
    path = check_location(out, "codes store", folder=True, sources=sources)
    is_store = (path / fc.MANIFEST).is_file() or (path / "building.json").is_file()
    if path.is_dir() and os.listdir(path) and not is_store:
        raise OutputError(
            f"{path}: folder exists and is not a codes store; give a new or empty folder"
        )


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m bossa_jax.data.codes",
        description="Per-song EnCodec codes store from a corpus's audio (data.codes_dir).",
    )
    parser.add_argument("--config", default=None, help="config (data section gives defaults)")
    parser.add_argument("--encodec", required=True, help="checkpoint of python -m convert.encodec")
    parser.add_argument("--dataset", choices=("pop909", "piast", "manifest"), default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--audio-dir", default=None)
    parser.add_argument("--out", default=None, help="codes store folder (default data.codes_dir)")
    parser.add_argument("--chunk-seconds", type=float, default=DEFAULT_CHUNK_SECONDS)
    parser.add_argument("--verbose", action="store_true", help="show libraries' log messages")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_config(args.config, args.overrides).data
    dataset = args.dataset or cfg.dataset
    out = args.out or cfg.codes_dir
    if not out:
        raise ConfigError("--out (config key 'data.codes_dir'): not set")
    check_chunk_seconds(args.chunk_seconds)
    data_dir = args.data_dir if args.data_dir is not None else cfg.data_dir
    audio_dir = args.audio_dir if args.audio_dir is not None else cfg.audio_dir
    check_store_output(out, [p for p in (data_dir, audio_dir, args.encodec) if p])
    sources = song_sources(dataset, data_dir, audio_dir)
    encode, compute_id = encodec_encoder(args.encodec)
    store, skipped = build_from_audio(
        out, sources, encode, compute_id=compute_id, chunk_seconds=args.chunk_seconds
    )
    print(f"wrote {out}: codes of {len(store.store)} songs; {skipped} skipped")
    return 0


if __name__ == "__main__":
    run_cli(main)
