"""Lead sheets in any format generate.py takes: MIDI, MusicXML and ABC (SPEC 6.2, 8.2, 11.3-11.4).

* ``.mid`` / ``.midi``: :func:`bossa_jax.symbolic.leadsheet.read_leadsheet` (first non-drum track
  the melody, every other one chords, SPEC 11.4).
* ``.musicxml`` / ``.mxl`` / ``.xml`` and ``.abc``: parsed with music21. The melody is every note of
  the first part that has notes (chords in it give all their pitches, tied notes are joined, grace
  notes skipped); the chords are the chord symbols (``harmony.ChordSymbol``) of every part, each
  lasting until the next symbol (a "no chord" symbol ends one) or the end of the piece, voiced as
  SPEC 6.2 voices chords (:func:`~bossa_jax.symbolic.leadsheet.bass_rooted_voicing`: the chord's
  pitch classes rolled to its bass at 48 + bass + interval, the bass sounded, velocity 80).

The music21 score becomes a two-track MIDI-like symusic Score (melody first, then chords, the
score's tempo marks and time signatures, a pickup bar padded to a whole bar) that goes through the
same :func:`~bossa_jax.symbolic.leadsheet.leadsheet_from_score` as a MIDI lead sheet, so a MusicXML
or ABC lead sheet gives exactly the prompt tokens of the equivalent MIDI file.

Every bad file is one :class:`~bossa_jax.errors.MidiError` line naming it: missing, empty, not
parseable, no melody, no chord symbols, or an unknown suffix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import symusic

from bossa_jax.errors import MidiError, one_line
from bossa_jax.symbolic.leadsheet import (
    CHORD_VELOCITY,
    bass_rooted_voicing,
    leadsheet_from_score,
    read_leadsheet,
)
from bossa_jax.symbolic.notes import Song

MIDI_SUFFIXES = (".mid", ".midi")
MUSIC21_FORMATS = {".musicxml": "musicxml", ".mxl": "musicxml", ".xml": "musicxml", ".abc": "abc"}
SUFFIXES = (*MIDI_SUFFIXES, *MUSIC21_FORMATS)
TPQ = 480
MELODY_VELOCITY = 100  # a note without a dynamic (the prompt redacts velocities anyway)


def read_any_leadsheet(path: str | os.PathLike) -> Song:
    """A lead-sheet file (MIDI, MusicXML or ABC by its suffix) -> Song (arrangement empty)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in MIDI_SUFFIXES:
        return read_leadsheet(p)
    if suffix not in MUSIC21_FORMATS:
        raise MidiError(
            f"{p}: unknown lead-sheet format {p.suffix or '(no suffix)'!r}; give one of "
            + ", ".join(SUFFIXES)
        )
    return leadsheet_from_score(music21_score(p), str(p))


def _parse(path: Path):
    """music21's parse of ``path`` (the first tune of an ABC book), errors as one line."""
    if not path.is_file():
        raise MidiError(f"{path}: no such lead-sheet file")
    if path.stat().st_size == 0:
        raise MidiError(f"{path}: the file is empty (0 bytes), not a lead sheet")
    import music21  # lazy: ~0.5 s of imports only MusicXML/ABC users pay

    kind = MUSIC21_FORMATS[path.suffix.lower()]
    try:
        parsed = music21.converter.parse(str(path), format=kind, forceSource=True)
    except Exception as err:  # music21 raises many unrelated types on a bad file
        detail = one_line(f"{type(err).__name__}: {err}")[:200]
        raise MidiError(f"{path}: corrupt or not a {kind} file ({detail})") from err
    if isinstance(parsed, music21.stream.Opus):
        scores = list(parsed.scores)
        if not scores:
            raise MidiError(f"{path}: the {kind} file holds no tune")
        parsed = scores[0]
    return parsed


def music21_score(path: str | os.PathLike) -> symusic.Score:
    """A MusicXML/ABC lead sheet -> a two-track symusic Score (melody, voiced chord symbols)."""
    from music21 import chord, harmony, meter, note, stream

    path = Path(path)
    score = _parse(path)
    parts = list(score.parts) if isinstance(score, stream.Score) and score.parts else [score]
    pickup = _pickup_padding(parts[0])

    def ticks(offset: float) -> int:
        return round((float(offset) + pickup) * TPQ)

    melody = symusic.Track(name="melody", program=0)
    for part in parts:
        part_offset = float(part.getOffsetInHierarchy(score)) if part is not score else 0.0
        joined = part.stripTies()  # a copy: offsets below are relative to the part
        for element in joined.recurse().notes:
            if isinstance(element, harmony.ChordSymbol) or element.quarterLength <= 0:
                continue
            if isinstance(element, note.Note):
                pitches = [element.pitch]
            elif isinstance(element, chord.Chord):
                pitches = list(element.pitches)
            else:
                continue
            start = ticks(part_offset + float(element.getOffsetInHierarchy(joined)))
            duration = round(float(element.quarterLength) * TPQ)
            velocity = element.volume.velocity or MELODY_VELOCITY
            for pitch in pitches:
                melody.notes.append(symusic.Note(start, duration, int(pitch.midi), int(velocity)))
        if len(melody.notes):
            break
    if not len(melody.notes):
        raise MidiError(f"{path}: the lead sheet has no melody (no part has notes)")

    symbols = sorted(
        (float(cs.getOffsetInHierarchy(score)), i, cs)
        for i, cs in enumerate(score.recurse().getElementsByClass(harmony.ChordSymbol))
    )
    if not any(not isinstance(cs, harmony.NoChord) for _, _, cs in symbols):
        raise MidiError(
            f"{path}: the lead sheet has no chord symbols (a lead sheet needs chords above the "
            'melody, e.g. MusicXML <harmony> elements or ABC "C" annotations)'
        )
    end = max([float(score.highestTime)] + [o for o, _, _ in symbols])
    chords = symusic.Track(name="chords", program=0)
    for (offset, _, cs), nxt in zip(symbols, [o for o, _, _ in symbols[1:]] + [end], strict=True):
        if isinstance(cs, harmony.NoChord) or nxt <= offset:
            continue
        for pitch in chord_symbol_voicing(cs, path):
            chords.notes.append(
                symusic.Note(ticks(offset), ticks(nxt) - ticks(offset), int(pitch), CHORD_VELOCITY)
            )

    out = symusic.Score(TPQ)
    for boundary_start, _, mark in score.metronomeMarkBoundaries():
        qpm = mark.getQuarterBPM()
        if qpm:
            out.tempos.append(symusic.Tempo(ticks(boundary_start) if boundary_start else 0, qpm))
    for ts in score.recurse().getElementsByClass(meter.TimeSignature):
        at = ts.getOffsetInHierarchy(score)
        out.time_signatures.append(
            symusic.TimeSignature(ticks(at) if at else 0, int(ts.numerator), int(ts.denominator))
        )
    out.tracks.append(melody)
    out.tracks.append(chords)
    return out


def chord_symbol_voicing(symbol, path: Path | str = "<score>") -> np.ndarray:
    """MIDI pitches of a music21 ChordSymbol, voiced as SPEC 6.2 (bass-rooted, bass sounded)."""
    try:
        pitch_classes = {int(p.pitchClass) for p in symbol.pitches}
        root, bass = int(symbol.root().pitchClass), int(symbol.bass().pitchClass)
    except Exception as err:  # an unparseable figure leaves no root or pitches
        raise MidiError(f"{path}: cannot read chord symbol {symbol.figure!r} ({err})") from err
    if not pitch_classes:
        raise MidiError(f"{path}: chord symbol {symbol.figure!r} has no pitches")
    bitmap = np.zeros(12, dtype=np.int64)
    bitmap[[(pc - root) % 12 for pc in pitch_classes]] = 1
    return bass_rooted_voicing(root, bitmap, bass, force_bass=True)


def _pickup_padding(part) -> float:
    """Quarter notes missing from an incomplete first bar (a pickup), so bars start on downbeats."""
    from music21 import stream

    measures = part.getElementsByClass(stream.Measure)
    if not measures:
        return 0.0
    return float(measures[0].paddingLeft or 0.0)
