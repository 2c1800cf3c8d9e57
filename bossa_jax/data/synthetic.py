"""A synthetic POP909-layout corpus, for tests, benchmarks and trying the pipelines without data.

:func:`write_pop909_song` writes one song folder exactly as POP909 lays it out (``NNN/NNN.mid``
with MELODY, BRIDGE and PIANO tracks, ``beat_midi.txt``, ``chord_midi.txt``) with symusic, and
optionally a quiet audio file of the same length with soundfile; :func:`fake_codes` gives
deterministic pseudo-EnCodec codes for an audio file (a stand-in ``encode_fn``).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import soundfile
import symusic

from bossa_jax import audio as audio_io
from bossa_jax.data import feature_cache as fc
from bossa_jax.data import readers
from bossa_jax.symbolic.midi import write_midi

CHORDS = (("C:maj", 48, (0, 4, 7)), ("A:min", 45, (0, 3, 7)), ("F:maj", 41, (0, 4, 7)))
CHORDS += (("G:maj", 43, (0, 4, 7)),)


def write_pop909_song(
    root: str | os.PathLike,
    name: str,
    *,
    bars: int = 32,
    qpm: float = 120.0,
    seed: int = 0,
    audio_root: str | os.PathLike | None = None,
    audio_rate: int = 8000,
) -> Path:
    """Writes ``<root>/<name>/`` (4/4, ``bars`` bars at ``qpm``) and, with ``audio_root``,
    ``<audio_root>/<name>.wav``; returns the song folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    tpq = 480
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(time=0, qpm=qpm))
    score.time_signatures.append(symusic.TimeSignature(time=0, numerator=4, denominator=4))
    tracks = {n: symusic.Track(name=n, program=0) for n in ("MELODY", "BRIDGE", "PIANO")}
    labels = []
    for bar in range(bars):
        label, root_pitch, intervals = CHORDS[int(rng.integers(len(CHORDS)))]
        labels.append(label)
        start = bar * 4 * tpq
        for beat in range(4):
            pitch = int(rng.integers(60, 79))
            tracks["MELODY"].notes.append(
                symusic.Note(start + beat * tpq, tpq - 40, pitch, int(rng.integers(60, 110)))
            )
        for half in range(2):
            tracks["BRIDGE"].notes.append(
                symusic.Note(start + half * 2 * tpq, 2 * tpq, root_pitch + 24 + intervals[1], 70)
            )
        for beat in range(0, 4, 2):
            for interval in intervals:
                tracks["PIANO"].notes.append(
                    symusic.Note(start + beat * tpq, 2 * tpq - 20, root_pitch + interval, 80)
                )
    for track in tracks.values():
        score.tracks.append(track)
    write_midi(score, folder / f"{name}.mid")

    beat_seconds = 60.0 / qpm
    beat_lines = []
    for i in range(bars * 4):
        is_down = 1.0 if i % 4 == 0 else 0.0
        beat_lines.append(f"{i * beat_seconds:.6f} {1.0 if i % 2 == 0 else 0.0} {is_down}")
    (folder / "beat_midi.txt").write_text("\n".join(beat_lines) + "\n")
    bar_seconds = 4 * beat_seconds
    chord_lines = [
        f"{b * bar_seconds:.6f}\t{(b + 1) * bar_seconds:.6f}\t{label}"
        for b, label in enumerate(labels)
    ]
    (folder / "chord_midi.txt").write_text("\n".join(chord_lines) + "\n")

    if audio_root is not None:
        seconds = bars * bar_seconds + 1.0
        n = int(seconds * audio_rate)
        noise = 0.05 * rng.standard_normal(n).astype(np.float32)
        path = Path(audio_root) / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), noise, audio_rate, subtype="PCM_16")
    return folder


def write_pop909_corpus(
    root: str | os.PathLike, songs: int, *, bars: int, compute_id: str = "synthetic"
) -> list[str]:
    """Writes ``songs`` songs (``001``, ``002``, ...; :func:`write_pop909_song`, seeded by their
    position) under ``<root>/pop909`` with audio under ``<root>/audio``, and their
    :func:`fake_codes` store under ``<root>/codes``; returns the song names."""
    root = Path(root)
    names = [f"{i + 1:03d}" for i in range(songs)]
    for i, name in enumerate(names):
        write_pop909_song(root / "pop909", name, bars=bars, seed=i, audio_root=root / "audio")
    records, _ = readers.read_songs(readers.pop909_sources(root / "pop909", root / "audio"))
    fc.build_codes_store(
        root / "codes",
        [(r.id, r.audio) for r in records],
        fake_codes,
        compute_id=compute_id,
        progress=False,
    )
    return names


def fake_codes(audio_path: str | os.PathLike, num_codebooks: int = 4) -> np.ndarray:
    """Deterministic stand-in for EnCodec: codes (4, ceil(seconds * 50)) seeded by the file name."""
    frames = math.ceil(audio_io.audio_duration(audio_path) * audio_io.FRAME_RATE)
    seed = int.from_bytes(hashlib.sha256(Path(audio_path).name.encode()).digest()[:8], "big")
    return np.random.default_rng(seed).integers(
        0, audio_io.PAD_CODE, size=(num_codebooks, frames), dtype=np.int16
    )


def fake_features(codes: np.ndarray, dim: int = 16) -> np.ndarray:
    """A cheap deterministic stand-in for the MusicGen feature stack: (b, 4, T) -> (b, T + 4, dim)
    (a fixed random embedding of each delay-pattern step's codes)."""
    codes = np.asarray(codes, dtype=np.int64)
    b, q, t = codes.shape
    pattern = np.full((b, q, t + audio_io.PATTERN_EXTRA), audio_io.PAD_CODE, dtype=np.int64)
    for k in range(q):
        pattern[:, k, k + 1 : k + 1 + t] = codes[:, k]
    rows = audio_io.PAD_CODE + 1
    table = np.random.default_rng(1234).standard_normal((q, rows, dim)).astype(np.float32)
    return sum(table[k][pattern[:, k]] for k in range(q)) / q
