"""Dataset readers: POP909, PIAST and a generic JSONL manifest -> songs with splits (DESIGN "Data";
SPEC 6.1, 6.2).

Reading is two steps: *list* the songs of a layout (paths only, cheap: :func:`pop909_sources`,
:func:`piast_sources`, :func:`manifest_sources`), then *read* them (:func:`read_songs`: MIDI parsed
by ``bossa_jax.symbolic``, the audio header checked). A song that cannot be read (missing or corrupt
MIDI, annotations or audio, no lead-sheet notes) is reported with one line on the logger and
skipped; :class:`ReadSummary` counts them. A corpus never fails half-way because of one song.

Layouts
-------
POP909 (``root`` = the POP909 folder of the official repository)::

    <root>/001/001.mid           MELODY, BRIDGE and PIANO tracks (arrangement = all of them)
    <root>/001/beat_midi.txt     beats: time, simple-meter flag, compound-meter flag
    <root>/001/chord_midi.txt    start<TAB>end<TAB>label (mir_eval syntax)

  Audio is not part of POP909. Give ``audio_root``; the first that exists is used:
  ``<audio_root>/001/accompaniment.{mp3,wav,flac,ogg}`` (the official vocal-removed audio,
  ``pop909_original&accompaniment/<song>/accompaniment.mp3``), then
  ``<audio_root>/001.{mp3,wav,flac,ogg}``.

PIAST (SPEC 6.2): ``<midi_root>/**/<stem>.mid`` with track 0 = piano performance (arrangement),
track 1 = melody, chords as MIDI markers ``root_quality_bass``; audio
``<audio_root>/<stem>.{mp3,wav,flac,ogg}`` (or ``<audio_root>/<stem>/audio.<ext>``). The official
code shifts PIAST audio so its first onset meets the first MIDI onset (SPEC 1.1); that alignment
belongs to the codes you store (``python -m bossa_jax.data.codes --dataset piast`` applies
:func:`bossa_jax.data.align.align_to_midi` with :func:`piast_first_note_seconds`), not to this
reader.

JSONL manifest (your own data), one object per line; paths are relative to the manifest's folder::

    {"arrangement": "songs/a.mid", "audio": "audio/a.wav", "leadsheet": "songs/a_lead.mid"}
    {"arrangement": "songs/b.mid", "audio": "audio/b.flac", "chords": "songs/b_chords.txt",
     "id": "b", "split": "test"}

  ``arrangement`` (required): a MIDI whose every track is the arrangement (downbeats from its time
  signatures, pretty_midi style). Lead sheet: ``leadsheet`` = a lead-sheet MIDI on the same timeline
  (first non-drum track melody, other tracks chords; its downbeats must agree with the
  arrangement's), or ``chords`` = a POP909-style ``chord_midi.txt`` with the melody taken from the
  arrangement track named ``melody_track`` (default ``MELODY``). Optional ``id`` (default: the
  arrangement's file stem), ``dataset`` (default: the manifest's stem), ``split`` (train /
  validation / test), ``style`` (a label, e.g. the style corpus's: kept on the record for
  evaluation and for stage 0's style attribute).

Splits are per song, never per window. In order of precedence: the manifest's ``split`` field, a
split file in the official ``dataset_split.json`` format (``{"<dataset>": {"validation": [names],
"test": [names]}}``, train = the rest; dataset names compared case-insensitively), else a hash of
the song id: 90/5/5 by ``sha256(id)``, so adding songs never moves existing ones (the official
fallback, 90/5/5 by listing order, reshuffles whenever the corpus changes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from bossa_jax import audio as audio_io
from bossa_jax.errors import BossaError, DataError, MidiError, one_line
from bossa_jax.symbolic import leadsheet as ls_io
from bossa_jax.symbolic import midi as midi_io
from bossa_jax.symbolic.notes import (
    INSTRUMENT,
    MELODY_INSTRUMENT,
    Song,
    arrangement_from_score,
    track_notes,
)

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg")
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
# Lead-sheet and arrangement downbeats must agree this closely (seconds) to share a timeline.
DOWNBEAT_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class SongSource:
    """Where one song's files are. ``id`` = ``<dataset>/<name>``; ``layout`` picks the reader."""

    dataset: str
    name: str
    layout: str  # "pop909" | "piast" | "manifest"
    midi: Path
    audio: Path | None
    leadsheet: Path | None = None
    chords: Path | None = None
    melody_track: str = "MELODY"
    split: str | None = None
    style: str | None = None  # a manifest's label (the style corpus's): evaluation, stage 0

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.name}"


@dataclasses.dataclass(frozen=True)
class SongRecord:
    """A read song: ``song`` (arrangement, lead sheet, downbeats), its audio file and split."""

    id: str
    dataset: str
    song: Song
    audio: Path | None
    split: str
    style: str | None = None


@dataclasses.dataclass
class ReadSummary:
    """What :func:`read_songs` (or a listing) did: songs read, and (id, reason) of each skip."""

    listed: int = 0
    read: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, song_id: str, reason: str, logger: logging.Logger | None = None) -> None:
        reason = one_line(reason)
        self.skipped.append((song_id, reason))
        (logger or log).warning("skipped %s: %s", song_id, reason)

    def merge(self, other: ReadSummary) -> ReadSummary:
        return ReadSummary(
            self.listed + other.listed, self.read + other.read, self.skipped + other.skipped
        )

    def __str__(self) -> str:
        return f"{self.read} songs read, {self.num_skipped} skipped (of {self.listed} listed)"


# --- audio lookup -------------------------------------------------------------------------------
def find_audio(candidates: Iterable[Path]) -> Path | None:
    """The first existing file among ``candidates`` (each tried with every audio extension)."""
    for base in candidates:
        for ext in AUDIO_EXTENSIONS:
            path = base.with_name(base.name + ext)
            if path.is_file():
                return path
    return None


# --- listing ------------------------------------------------------------------------------------
def pop909_sources(
    root: str | os.PathLike, audio_root: str | os.PathLike | None = None, dataset: str = "pop909"
) -> list[SongSource]:
    """The song folders ``<root>/<name>/`` of a POP909 tree (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: POP909 folder not found")
    sources = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = folder.name
        audio = None
        if audio_root is not None:
            a = Path(audio_root)
            audio = find_audio([a / name / "accompaniment", a / name])
        sources.append(SongSource(dataset, name, "pop909", folder / f"{name}.mid", audio))
    if not sources:
        raise DataError(f"{root}: no song folders (expected <root>/001/001.mid ...)")
    return sources


def piast_sources(
    midi_root: str | os.PathLike,
    audio_root: str | os.PathLike | None = None,
    dataset: str = "piast",
) -> list[SongSource]:
    """Every ``<midi_root>/**/<stem>.mid`` of a PIAST tree (see the module docstring)."""
    midi_root = Path(midi_root)
    if not midi_root.is_dir():
        raise DataError(f"{midi_root}: PIAST MIDI folder not found")
    files = sorted(p for p in midi_root.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    if not files:
        raise DataError(f"{midi_root}: no .mid files")
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(f"{midi_root}: two MIDI files share the song name {dup!r}")
    sources = []
    for path in files:
        audio = None
        if audio_root is not None:
            a = Path(audio_root)
            audio = find_audio([a / path.stem, a / path.stem / "audio"])
        sources.append(SongSource(dataset, path.stem, "piast", path, audio))
    return sources


def piast_first_note_seconds(midi: str | os.PathLike) -> float:
    """Onset (seconds) of the first note of a PIAST file's piano track (its first track with notes,
    the arrangement of :func:`bossa_jax.symbolic.leadsheet.read_piast`): the MIDI side of the
    onset alignment (SPEC 1.1; official: pretty_midi ``instruments[0]``)."""
    score = midi_io.load_midi(midi)
    piano = next(t for t in score.tracks if len(t.notes))
    first_tick = float(np.min(piano.notes.numpy()["time"]))
    return float(midi_io.TempoMap.from_score(score).to_seconds(first_tick))


def manifest_sources(
    path: str | os.PathLike, logger: logging.Logger | None = None
) -> tuple[list[SongSource], ReadSummary]:
    """The songs of a JSONL manifest; a malformed line is reported, skipped and counted."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read the manifest ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text file; a manifest is JSON lines (UTF-8)") from err
    base = path.parent
    summary = ReadSummary()
    sources, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        summary.listed += 1
        where = f"{path}:{number}"
        try:
            sources.append(_manifest_entry(line, base, path.stem))
        except DataError as err:
            summary.skip(where, str(err), logger)
            continue
        if sources[-1].id in seen:
            summary.skip(where, f"duplicate song id {sources[-1].id!r}", logger)
            sources.pop()
        else:
            seen.add(sources[-1].id)
    return sources, summary


_MANIFEST_KEYS = {"arrangement", "audio", "leadsheet", "chords", "id", "dataset", "split"}


def _manifest_entry(line: str, base: Path, default_dataset: str) -> SongSource:
    try:
        entry = json.loads(line)
    except ValueError as err:
        raise DataError(f"not a JSON object ({err})") from err
    if not isinstance(entry, dict):
        raise DataError("not a JSON object")
    unknown = set(entry) - _MANIFEST_KEYS - {"melody_track", "style"}
    if unknown:
        raise DataError(f"unknown keys {sorted(unknown)} (known: {sorted(_MANIFEST_KEYS)})")
    if not isinstance(entry.get("arrangement"), str):
        raise DataError("needs an 'arrangement' MIDI path")
    if entry.get("leadsheet") is None and entry.get("chords") is None:
        raise DataError("needs a 'leadsheet' MIDI or a 'chords' file")
    split = entry.get("split")
    if split is not None and split not in SPLITS:
        raise DataError(f"'split' must be one of {SPLITS}, got {split!r}")

    def resolve(key: str) -> Path | None:
        value = entry.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise DataError(f"'{key}' must be a path string")
        p = Path(value)
        return p if p.is_absolute() else base / p

    arrangement = resolve("arrangement")
    return SongSource(
        dataset=str(entry.get("dataset", default_dataset)),
        name=str(entry.get("id", arrangement.stem)),
        layout="manifest",
        midi=arrangement,
        audio=resolve("audio"),
        leadsheet=resolve("leadsheet"),
        chords=resolve("chords"),
        melody_track=str(entry.get("melody_track", "MELODY")),
        split=split,
        style=None if entry.get("style") is None else str(entry["style"]),
    )


# --- splits -------------------------------------------------------------------------------------
def hash_split(song_id: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """train / validation / test from sha256(song_id): stable as songs are added or removed."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise DataError(
            f"split fractions must be three non-negative numbers summing to 1: {fractions}"
        )
    u = int.from_bytes(hashlib.sha256(song_id.encode()).digest()[:8], "big") / 2.0**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def load_split_file(path: str | os.PathLike) -> dict[str, dict[str, set[str]]]:
    """``dataset_split.json`` (SPEC 6.1) -> {dataset (lower case): {"validation"|"test": names}}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the split file ({one_line(str(err))})") from err
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected an object {{dataset: {{validation: [...], test: [...]}}}}"
        )
    out: dict[str, dict[str, set[str]]] = {}
    for dataset, splits in data.items():
        if not isinstance(splits, dict) or set(splits) - {"validation", "test", "train"}:
            raise DataError(f"{path}: key {dataset!r} must map 'validation'/'test' to name lists")
        out[dataset.lower()] = {k: {str(n) for n in v} for k, v in splits.items() if k != "train"}
    return out


def split_of(
    source: SongSource,
    split_table: Mapping[str, Mapping[str, set[str]]] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> str:
    """The song's split: manifest field, else the split file, else :func:`hash_split`."""
    if source.split is not None:
        return source.split
    if split_table is not None:
        table = split_table.get(source.dataset.lower())
        if table is not None:
            for split in ("validation", "test"):
                if source.name in table.get(split, ()):
                    return split
            return "train"
    return hash_split(source.id, fractions)


# --- reading ------------------------------------------------------------------------------------
def read_song(source: SongSource) -> Song:
    """Parses one song's symbolic files (raises MidiError / DataError)."""
    if source.layout == "pop909":
        if not source.midi.is_file():
            raise MidiError(f"{source.midi}: no such MIDI file")
        return ls_io.read_pop909(source.midi.parent)
    if source.layout == "piast":
        return ls_io.read_piast(source.midi)
    if source.layout == "manifest":
        return _read_manifest_song(source)
    raise DataError(f"unknown layout {source.layout!r}")


def _read_manifest_song(source: SongSource) -> Song:
    score = midi_io.load_midi(source.midi)
    arrangement, grid = arrangement_from_score(score)
    if len(arrangement) == 0:
        raise MidiError(f"{source.midi}: no note on or after the first downbeat in the pitch range")
    if source.leadsheet is not None:
        lead = ls_io.read_leadsheet(source.leadsheet)
        a, b = grid.downbeat_times, lead.downbeat_times
        n = min(len(a), len(b))
        if n == 0 or np.max(np.abs(a[:n] - b[:n])) > DOWNBEAT_TOLERANCE:
            raise DataError(
                f"{source.leadsheet}: its bars do not line up with {source.midi} (give both files "
                "the same tempo map and time signatures)"
            )
        table = lead.leadsheet
    else:
        tracks = [t for t in score.tracks if t.name.strip().upper() == source.melody_track.upper()]
        if not tracks:
            raise MidiError(f"{source.midi}: no track named {source.melody_track!r} for the melody")
        on, off, pitch, vel = track_notes(score, tracks[0], grid.tempo)
        melody = grid.quantize(on, off, pitch, vel, np.full(len(on), MELODY_INSTRUMENT))
        chords = ls_io.pop909_chord_table(
            grid, ls_io.read_pop909_chords(source.chords), str(source.chords)
        )
        table = melody.concat(chords).sorted()
    if not np.any(table.events[:, INSTRUMENT] == MELODY_INSTRUMENT):
        raise MidiError(f"{source.midi}: the lead sheet has no melody notes")
    return Song(source.name, arrangement, table, grid.downbeat_times)


def read_songs(
    sources: Sequence[SongSource],
    *,
    split: str | Sequence[str] | None = None,
    split_file: str | os.PathLike | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    require_audio: bool = True,
    logger: logging.Logger | None = None,
) -> tuple[list[SongRecord], ReadSummary]:
    """Reads the songs (of the requested split(s) only), skipping and counting unreadable ones.

    ``require_audio``: a song whose audio is missing or has an unreadable header is skipped.
    """
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    if wanted is not None and wanted - set(SPLITS):
        raise DataError(f"unknown split(s) {sorted(wanted - set(SPLITS))}; use {SPLITS}")
    table = load_split_file(split_file) if split_file is not None else None
    summary = ReadSummary()
    records = []
    for source in sources:
        song_split = split_of(source, table, fractions)
        if wanted is not None and song_split not in wanted:
            continue
        summary.listed += 1
        try:
            if require_audio:
                if source.audio is None:
                    raise DataError("no audio file found for it")
                audio_io.audio_duration(source.audio)
            song = read_song(source)
        except (BossaError, OSError) as err:
            # what a bad song raises (the symbolic and audio readers turn decoder errors into
            # MidiError / AudioError); anything else is a bug and must not pass as a skipped song
            summary.skip(source.id, str(err), logger)
            continue
        records.append(
            SongRecord(source.id, source.dataset, song, source.audio, song_split, source.style)
        )
        summary.read += 1
    (logger or log).info("%s", summary)
    return records, summary
