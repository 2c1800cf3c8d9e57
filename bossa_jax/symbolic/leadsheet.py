"""Lead sheets: melody (instrument 0) + chord tones (instrument 4) (SPEC 6.2, 8.2, 11.4, 11.5).

Three sources:

* :func:`read_leadsheet`: a lead-sheet MIDI (inference; official ``read_leadsheet``). The first
  non-drum instrument with notes (pretty_midi ``instruments[0]``) is the melody, every other one the
  chords. Drum tracks are ignored (a drums-only file has no melody and is an error).
* :func:`read_pop909`: a POP909 song folder: ``<song>.mid`` (arrangement = every track), the MELODY
  track, ``beat_midi.txt`` (beats and meter) and ``chord_midi.txt`` (chord labels, mir_eval syntax).
* :func:`read_piast`: a PIAST MIDI: track 0 piano (arrangement, instrument 0), track 1 melody, chord
  markers ``root_quality_bass``; 4/4 grid from the tempo map (time signatures ignored).

Chord voicings (velocity 80, instrument 4):

* POP909: the quality bitmap plus extension degrees, rolled to the bass pitch class; the bass is
  not forced on; notes at 48 + bass + interval (36 + ... when the bass is not a chord tone and the
  lowest chord tone above it passes the octave); a chord lasts until the next label's start;
  labels containing ``N`` (and ``X``) and the last label are skipped.
* PIAST: M->maj, m->min, +->aug, /o->hdim7, o->dim; bass forced on; 48 + bass + interval; chords of
  zero grid length dropped; ``bpm`` and ``N`` markers skipped; the last chord lasts to the end.

Chord labels are parsed in the mir_eval style without depending on mir_eval; omitted degrees
(``C:maj7(*5)``) are removed (mir_eval-based official code would crash on them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import symusic

from bossa_jax.errors import MidiError
from bossa_jax.symbolic import midi as midi_io
from bossa_jax.symbolic.notes import (
    CHORD_INSTRUMENT,
    INSTRUMENT,
    MELODY_INSTRUMENT,
    TIME_SIGNATURE,
    BeatGrid,
    NoteTable,
    Song,
    arrangement_from_score,
    midi_grid,
    time_signature_code,
    track_notes,
)

CHORD_VELOCITY = 80

# POP909 pieces annotated in triple meter: their simple-meter column is used (SPEC 6.2).
POP909_TRIPLE_METER = frozenset(
    "034 062 102 107 152 173 176 203 215 231 254 280 307 328 369 584 592 624 653 654 662 744 "
    "749 756 770 799 869 872 887".split()
)

_PITCH_CLASSES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_SCALE_DEGREES = {
    "1": 0, "2": 2, "3": 4, "4": 5, "5": 7, "6": 9, "7": 11,
    "8": 12, "9": 14, "10": 16, "11": 17, "12": 19, "13": 21,
}  # fmt: skip
_QUALITIES = {
    "maj": "100010010000", "min": "100100010000", "aug": "100010001000",
    "dim": "100100100000", "sus4": "100001010000", "sus2": "101000010000",
    "7": "100010010010", "maj7": "100010010001", "min7": "100100010010",
    "minmaj7": "100100010001", "maj6": "100010010100", "min6": "100100010100",
    "dim7": "100100100100", "hdim7": "100100100010", "maj9": "101010010001",
    "min9": "101100010010", "9": "101010010010", "b9": "110010010010",
    "#9": "100110010010", "min11": "101101010010", "11": "101011010010",
    "#11": "101010110010", "maj13": "101010010101", "min13": "101100010110",
    "13": "101010010110", "b13": "101010011010", "1": "100000000000",
    "5": "100000010000", "": "000000000000",
}  # fmt: skip


class ChordLabelError(ValueError):
    """A chord label outside the mir_eval grammar."""


def pitch_class(name: str) -> int:
    """'C#', 'Bb', 'Fbb' -> pitch class (mir_eval ``pitch_class_to_semitone``)."""
    if not name or name[0] not in _PITCH_CLASSES or any(c not in "#b" for c in name[1:]):
        raise ChordLabelError(f"invalid pitch class {name!r}")
    return (_PITCH_CLASSES[name[0]] + name.count("#") - name[1:].count("b")) % 12


def scale_degree(degree: str) -> int:
    """'b7', '#9', '3' -> semitones above the root (mir_eval ``scale_degree_to_semitone``)."""
    digits = degree.lstrip("#b")
    if digits not in _SCALE_DEGREES:
        raise ChordLabelError(f"invalid scale degree {degree!r}")
    return (
        _SCALE_DEGREES[digits] + degree.count("#") - degree[: len(degree) - len(digits)].count("b")
    )


def parse_chord(label: str) -> tuple[int, np.ndarray, int] | None:
    """A mir_eval chord label -> (root pitch class, 12-bit root-relative bitmap with extensions,
    bass pitch class), or None for no-chord (``N``/``X``). Raises ChordLabelError."""
    label = label.strip()
    if label in ("N", "X"):
        return None
    bass = "1"
    if label.count("/") > 1 or label.count("(") > 1 or label.count(":") > 1:
        raise ChordLabelError(f"invalid chord label {label!r}")
    if "/" in label:
        label, bass = label.split("/")
    degrees: list[str] = []
    if "(" in label:
        label, inner = label.split("(")
        if not inner.endswith(")"):
            raise ChordLabelError(f"invalid chord label {label}({inner}")
        degrees = [d.strip() for d in inner[:-1].split(",") if d.strip()]
    quality = "" if degrees else "maj"
    if ":" in label:
        root, name = label.split(":")
        if name:
            quality = name.lower()
    else:
        root = label
    if quality not in _QUALITIES:
        raise ChordLabelError(f"unknown chord quality {quality!r}")
    bitmap = np.array([int(c) for c in _QUALITIES[quality]], dtype=np.int64)
    for d in degrees:
        if not d.startswith("*"):
            bitmap[scale_degree(d) % 12] = 1
    for d in degrees:
        if d.startswith("*"):
            bitmap[scale_degree(d[1:]) % 12] = 0
    root_pc = pitch_class(root)
    return root_pc, bitmap, (scale_degree(bass) + root_pc) % 12


def bass_rooted_voicing(
    root: int, bitmap: np.ndarray, bass: int, *, force_bass: bool = False
) -> np.ndarray:
    """SPEC 6.2's chord voicing: the root-relative 12-bit ``bitmap`` rolled to the ``bass`` pitch
    class, notes at 48 + bass + interval (36 + ... when the bass is not sounded and the lowest
    chord tone above it passes the octave). ``force_bass`` sounds the bass (PIAST; POP909 does
    not)."""
    rolled = np.roll(np.asarray(bitmap, dtype=np.int64), root - bass)
    if force_bass:
        rolled[0] = 1
    register = 3 if bass + int(np.argmax(rolled)) > 11 else 4
    return register * 12 + bass + np.flatnonzero(rolled)


def pop909_voicing(label: str) -> np.ndarray:
    """MIDI pitches of a POP909 chord label (official ``arrange_pop909.read_chord``)."""
    parsed = parse_chord(label)
    if parsed is None:
        return np.zeros(0, dtype=np.int64)
    root, bitmap, bass = parsed
    return bass_rooted_voicing(root, bitmap, bass)


_PIAST_QUALITY = (("M", "maj"), ("m", "min"), ("+", "aug"))


def piast_voicing(marker: str) -> np.ndarray:
    """MIDI pitches of a PIAST ``root_quality_bass`` marker (official ``arrange_PIAST.read_chord``),
    bass forced on, at 48 + bass + interval."""
    parts = marker.split("_")
    if len(parts) != 3:
        raise ChordLabelError(f"invalid chord marker {marker!r} (expected root_quality_bass)")
    root, quality, bass = parts
    for sym, name in _PIAST_QUALITY:
        if sym in quality:
            quality = name + quality[1:]
            break
    else:
        if "/o" in quality:
            quality = "hdim7"
        elif "o" in quality:
            quality = "dim" + quality[1:]
    parsed = parse_chord(f"{root}:{quality}")
    assert parsed is not None
    root_pc, bitmap, _ = parsed
    return bass_rooted_voicing(root_pc, bitmap, pitch_class(bass), force_bass=True)


def _chord_table(
    grid: BeatGrid,
    starts: np.ndarray,
    ends: np.ndarray,
    voicings: list[np.ndarray],
    *,
    piast: bool = False,
) -> NoteTable:
    onsets, offsets, pitches = [], [], []
    for s, e, v in zip(starts, ends, voicings, strict=True):
        onsets.extend([s] * len(v))
        offsets.extend([e] * len(v))
        pitches.extend(v.tolist())
    n = len(pitches)
    return grid.quantize(
        np.array(onsets),
        np.array(offsets),
        np.array(pitches, dtype=np.int64),
        np.full(n, CHORD_VELOCITY),
        np.full(n, CHORD_INSTRUMENT),
        pitch_filter=not piast,
        drop_zero_length=piast,
        snapped_onsets=piast,
    )


def _melody_table(grid: BeatGrid, score: symusic.Score, track) -> NoteTable:
    on, off, pitch, vel = track_notes(score, track, grid.tempo)
    return grid.quantize(on, off, pitch, vel, np.full(len(on), MELODY_INSTRUMENT))


def _require_melody(table: NoteTable, where: str) -> None:
    if not np.any(table.events[:, INSTRUMENT] == MELODY_INSTRUMENT):
        raise MidiError(
            f"{where}: the lead sheet has no melody notes (the first non-drum track must be the "
            "melody, with notes on or after the first downbeat)"
        )


def leadsheet_from_score(score: symusic.Score, name: str = "<score>") -> Song:
    """Two-track lead-sheet Score -> Song with the lead sheet (arrangement empty)."""
    grid = midi_grid(score)
    tracks = [t for t in score.tracks if len(t.notes) and not t.is_drum]
    if not tracks:
        raise MidiError(f"{name}: the lead sheet has no melody notes (no non-drum track has notes)")
    parts = [_melody_table(grid, score, tracks[0])]
    for track in tracks[1:]:
        on, off, pitch, vel = track_notes(score, track, grid.tempo)
        parts.append(grid.quantize(on, off, pitch, vel, np.full(len(on), CHORD_INSTRUMENT)))
    table = parts[0]
    for p in parts[1:]:
        table = table.concat(p)
    table = table.sorted()
    _require_melody(table, name)
    return Song(name, NoteTable(), table, grid.downbeat_times)


def read_leadsheet(path: str | os.PathLike) -> Song:
    """Lead-sheet MIDI file (melody first, then chords) -> Song (SPEC 8.2, 11.4)."""
    return leadsheet_from_score(midi_io.load_midi(path), str(path))


# --- POP909 -------------------------------------------------------------------------------------
def read_pop909_beats(path: str | os.PathLike, triple_meter: bool) -> tuple[np.ndarray, np.ndarray]:
    """``beat_midi.txt`` -> (beat times, downbeat flags) from the simple (triple-meter pieces) or
    compound meter column."""
    try:
        table = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as err:
        raise MidiError(f"{path}: cannot read beat annotations ({err})") from err
    if table.shape[1] < 3 or len(table) < 2:
        raise MidiError(f"{path}: expected at least two rows of 'time simple compound' beats")
    return table[:, 0], table[:, 1 if triple_meter else 2] == 1


def read_pop909_chords(path: str | os.PathLike) -> list[tuple[float, str]]:
    """``chord_midi.txt`` lines ``start<TAB>end<TAB>label`` -> [(start, label)] (ends unused)."""
    chords = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise MidiError(f"{path}: cannot read chord annotations ({err.strerror})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            chords.append((float(fields[0]), fields[2].strip()))
        except (IndexError, ValueError) as err:
            raise MidiError(f"{path}:{number}: expected 'start<TAB>end<TAB>label'") from err
    return chords


def pop909_chord_table(grid: BeatGrid, chords: list[tuple[float, str]], where: str) -> NoteTable:
    starts, ends, voicings = [], [], []
    for (start, label), (nxt, _) in zip(chords[:-1], chords[1:], strict=True):
        if "N" in label or label.strip() == "X":
            continue
        try:
            voicing = pop909_voicing(label)
        except ChordLabelError as err:
            raise MidiError(f"{where}: {err}") from err
        starts.append(start)
        ends.append(nxt)
        voicings.append(voicing)
    return _chord_table(grid, np.array(starts), np.array(ends), voicings)


def read_pop909(song_dir: str | os.PathLike, *, triple_meter: bool | None = None) -> Song:
    """A POP909 folder ``<dir>/<name>.mid``, ``beat_midi.txt``, ``chord_midi.txt`` -> Song."""
    folder = Path(song_dir)
    name = folder.name
    score = midi_io.load_midi(folder / f"{name}.mid")
    if triple_meter is None:
        triple_meter = name in POP909_TRIPLE_METER
    beats, flags = read_pop909_beats(folder / "beat_midi.txt", triple_meter)
    tempo = midi_io.TempoMap.from_score(score)
    try:
        grid = BeatGrid(beats, flags, tempo)
    except ValueError as err:
        raise MidiError(f"{folder / 'beat_midi.txt'}: {err}") from err
    arrangement, _ = arrangement_from_score(score, grid)
    tracks = [t for t in score.tracks if len(t.notes)]
    melody = next((t for t in tracks if t.name.strip().upper() == "MELODY"), tracks[0])
    chord_path = folder / "chord_midi.txt"
    chords = pop909_chord_table(grid, read_pop909_chords(chord_path), str(chord_path))
    leadsheet = _melody_table(grid, score, melody).concat(chords).sorted()
    _require_melody(leadsheet, str(folder))
    return Song(name, arrangement, leadsheet, grid.downbeat_times)


# --- PIAST --------------------------------------------------------------------------------------
def read_piast(path: str | os.PathLike) -> Song:
    """PIAST MIDI (track 0 piano, track 1 melody, chord markers) -> Song (SPEC 6.2, 11.5)."""
    score = midi_io.load_midi(path)
    tracks = [t for t in score.tracks if len(t.notes)]
    if len(tracks) < 2:
        raise MidiError(f"{path}: a PIAST file needs a piano track and a melody track")
    grid = midi_grid(score, ignore_time_signatures=True)
    piano = tracks[0]
    on, off, pitch, vel = track_notes(score, piano, grid.tempo)
    arrangement = grid.quantize(on, off, pitch, vel, np.zeros(len(on), dtype=np.int64))
    markers = sorted(score.markers, key=lambda m: m.time)
    times = [m.time for m in markers] + [midi_io.end_tick(score)]
    starts, ends, voicings = [], [], []
    for i, marker in enumerate(markers):
        text = marker.text.strip()
        if "bpm" in text or "N" in text:
            continue
        try:
            voicing = piast_voicing(text)
        except ChordLabelError as err:
            raise MidiError(f"{path}: {err}") from err
        starts.append(times[i])
        ends.append(times[i + 1])
        voicings.append(voicing)
    chords = _chord_table(
        grid,
        grid.tempo.to_seconds(np.array(starts, dtype=np.float64)),
        grid.tempo.to_seconds(np.array(ends, dtype=np.float64)),
        voicings,
        piast=True,
    )
    leadsheet = _melody_table(grid, score, tracks[1]).concat(chords).sorted()
    _require_melody(leadsheet, str(path))
    return Song(
        Path(path).stem,
        _force_four_four(arrangement),
        _force_four_four(leadsheet),
        grid.downbeat_times,
    )


def _force_four_four(table: NoteTable) -> NoteTable:
    """PIAST writes time signature (4, 4) on every note, whatever the bar's beat count."""
    events = table.events.copy()
    events[:, TIME_SIGNATURE] = time_signature_code(4, 4)
    return table.with_events(events)
