"""What an arrangement kept of its lead sheet and how far apart two arrangements are (issue 11,
item 5: the paper's style-transfer figures at mini scale; ``bench/mini_eval.py`` reports them).

Arrangements and lead sheets are octuple note tables (:class:`~bossa_jax.symbolic.notes.NoteTable`
or their (N, 8) event arrays) on the same bars: bar 0 of the arrangement is bar 0 of the lead sheet
it was made from. A note is placed by (bar, position on the 12-per-beat grid); drum notes never
count.

* :func:`melody_preservation`: the fraction of the lead sheet's melody notes (instrument 0) that the
  arrangement plays at the same bar, position and pitch.
* :func:`chord_tone_fraction`: the fraction of the arrangement's accompaniment notes (the
  arrangement minus the melody notes it keeps, as the style classifier sees it) whose pitch class
  belongs to the lead-sheet chord sounding at the note's onset (the chord whose notes, instrument
  4, started last at or before it); notes before the first chord are not counted.
* :func:`accompaniment_distance`: 1 - Jaccard index of the (bar, position, pitch) sets of two
  arrangements' accompaniments (0: the same notes at the same times; 1: nothing in common).
* :func:`style_distance`: the L1 distance of the style classifier's texture features
  (occupancy, off-beat share, single-note and chord shares, span in octaves, each about 0..1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from bossa_jax.data import style_classifier
from bossa_jax.symbolic.notes import (
    BAR,
    CHORD_INSTRUMENT,
    DRUM_INSTRUMENT,
    INSTRUMENT,
    MELODY_INSTRUMENT,
    PITCH,
    POSITION,
    TICKS_PER_BEAT,
    TIME_SIGNATURE,
    NoteTable,
    time_signature_of,
)

Notes = NoteTable | np.ndarray
T = TypeVar("T")


def events_of(notes: Notes) -> np.ndarray:
    """The (N, 8) int64 octuple rows of a table or array."""
    events = notes.events if isinstance(notes, NoteTable) else np.asarray(notes)
    return np.asarray(events, dtype=np.int64).reshape(-1, 8)


def melody_of(leadsheet: Notes) -> np.ndarray:
    """The lead sheet's melody rows (instrument 0)."""
    events = events_of(leadsheet)
    return events[events[:, INSTRUMENT] == MELODY_INSTRUMENT]


def onset_pitch_set(notes: Notes) -> set[tuple[int, int, int]]:
    """(bar, position, pitch) of every non-drum note."""
    events = events_of(notes)
    events = events[events[:, INSTRUMENT] != DRUM_INSTRUMENT]
    return {tuple(row) for row in events[:, [BAR, POSITION, PITCH]].tolist()}


def melody_preservation(arrangement: Notes, leadsheet: Notes) -> float:
    """The fraction of the lead sheet's melody notes the arrangement plays at the same bar,
    position and pitch (NaN when the lead sheet has no melody)."""
    melody = onset_pitch_set(melody_of(leadsheet))
    if not melody:
        return float("nan")
    return len(melody & onset_pitch_set(arrangement)) / len(melody)


def bar_starts(notes: Sequence[Notes], bars: int) -> np.ndarray:
    """The grid tick (12 per beat) where each of ``bars`` bars starts: a bar lasts its notes' most
    common time signature (quarter-note beats), an empty bar the previous one's (4/4 first)."""
    events = np.concatenate([events_of(n) for n in notes]) if notes else np.zeros((0, 8), np.int64)
    starts = np.zeros(bars + 1, dtype=np.int64)
    beats = 4
    for bar in range(bars):
        codes = events[events[:, BAR] == bar, TIME_SIGNATURE]
        if len(codes):
            values, counts = np.unique(codes, return_counts=True)
            numerator, denominator = time_signature_of(int(values[np.argmax(counts)]))
            beats = max(1, round(numerator * 4 / denominator))
        starts[bar + 1] = starts[bar] + beats * TICKS_PER_BEAT
    return starts


def chord_timeline(leadsheet: Notes, starts: np.ndarray) -> tuple[np.ndarray, list[frozenset]]:
    """(onset ticks, pitch-class sets) of the lead sheet's chords in time order: one entry per
    onset of chord notes (instrument 4)."""
    events = events_of(leadsheet)
    chords = events[events[:, INSTRUMENT] == CHORD_INSTRUMENT]
    groups: dict[int, set[int]] = {}
    for bar, position, pitch in chords[:, [BAR, POSITION, PITCH]].tolist():
        if bar < len(starts):
            groups.setdefault(int(starts[bar]) + position, set()).add(pitch % 12)
    ticks = sorted(groups)
    return np.asarray(ticks, dtype=np.int64), [frozenset(groups[t]) for t in ticks]


def chord_tone_fraction(arrangement: Notes, leadsheet: Notes) -> tuple[float, int]:
    """(fraction of the accompaniment notes that are tones of the chord sounding at their onset,
    number of notes counted); NaN when none is counted (no accompaniment under a chord)."""
    accompaniment = style_classifier.accompaniment(events_of(arrangement), events_of(leadsheet))
    if len(accompaniment) == 0:
        return float("nan"), 0
    bars = int(max(accompaniment[:, BAR].max(), events_of(leadsheet)[:, BAR].max(initial=0))) + 1
    starts = bar_starts([leadsheet, arrangement], bars)
    ticks, chords = chord_timeline(leadsheet, starts)
    if len(ticks) == 0:
        return float("nan"), 0
    onsets = starts[accompaniment[:, BAR]] + accompaniment[:, POSITION]
    which = np.searchsorted(ticks, onsets, side="right") - 1
    counted = which >= 0
    if not counted.any():
        return float("nan"), 0
    tones = [
        pitch % 12 in chords[i]
        for pitch, i in zip(accompaniment[counted, PITCH].tolist(), which[counted].tolist())
    ]
    return float(np.mean(tones)), len(tones)


def jaccard_distance(a: set, b: set) -> float:
    """1 - |a & b| / |a | b| (0 for two empty sets)."""
    union = a | b
    return 1.0 - len(a & b) / len(union) if union else 0.0


def accompaniment_distance(first: Notes, second: Notes, leadsheet: Notes | None = None) -> float:
    """1 - Jaccard of the (bar, position, pitch) sets of two arrangements' accompaniments (the
    lead sheet's melody notes removed from both; without a lead sheet the whole arrangements)."""
    melody = None if leadsheet is None else events_of(leadsheet)

    def notes(arrangement: Notes) -> set[tuple[int, int, int]]:
        events = events_of(arrangement)
        if melody is not None:
            events = style_classifier.accompaniment(events, melody)
        return onset_pitch_set(events)

    return jaccard_distance(notes(first), notes(second))


def texture_vector(arrangement: Notes, leadsheet: Notes | None = None) -> np.ndarray:
    """The style classifier's texture features of an arrangement, each scaled to about 0..1:
    occupancy, off-beat share, single-note share, chord share, bar span in octaves / 2."""
    f = style_classifier.style_features(events_of(arrangement), leadsheet)
    return np.array([f.occupancy, f.offbeat, f.single, f.chord, f.span / 24.0])


def style_distance(first: Notes, second: Notes, leadsheet: Notes | None = None) -> float:
    """L1 distance of :func:`texture_vector` of two arrangements of the same lead sheet."""
    return float(np.abs(texture_vector(first, leadsheet) - texture_vector(second, leadsheet)).sum())


def mean_pairwise(items: Sequence[T], distance: Callable[[T, T], float]) -> float:
    """Mean of ``distance`` over all unordered pairs of ``items`` (NaN for fewer than two)."""
    values = [distance(a, b) for a, b in itertools.combinations(items, 2)]
    return float(np.mean(values)) if values else float("nan")
