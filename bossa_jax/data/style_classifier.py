"""A rule-based accompaniment-style classifier, written from the style definitions of
:mod:`bossa_jax.data.style_corpus` (not learned; issue 11, item 5).

It reads an arrangement as an octuple :class:`~bossa_jax.symbolic.notes.NoteTable` (12 positions
per beat; a whole song or a 4-bar window) and judges only the accompaniment: the arrangement minus
the lead sheet's melody notes (same bar, position and pitch) when the melody is given, else the
notes below :data:`~bossa_jax.data.style_corpus.MELODY_LOW` (the corpus keeps the melody above
and the accompaniment below). Onsets are grouped per (bar, position) and placed on the eighth-note
grid. The rules, in order:

1. meter 3/4 -> ``waltz`` (bass on 1, chords on 2 and 3 is the only 3/4 style);
2. nearly every eighth of a bar has an onset (occupancy >= 0.9):
   single notes (>= 75% of onsets one pitch class) -> an arpeggiated figure: ``alberti`` when a
   bar spans less than an octave (closed triad, low-high-middle-high), else ``ballad`` (wide
   arpeggio); chords (>= 50% of onsets three or more pitch classes) -> ``pop`` (repeated block
   chords);
3. onsets (almost) only on the beats -> ``stride`` (bass and chords alternating on the beats);
4. otherwise (off-beat onsets, eighths partly empty: syncopation) -> ``bossa``.

``python -m bossa_jax.data.style_classifier [--songs 100] [--seed 0] [--bars 16]`` checks it on
ground-truth arrangements of a generated corpus (whole songs and every 4-bar window, with and
without the melody given) and prints the accuracy and the confusion matrices.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import numpy as np

from bossa_jax.data import style_corpus as corpus
from bossa_jax.errors import run_cli
from bossa_jax.symbolic.notes import (
    BAR,
    DRUM_INSTRUMENT,
    INSTRUMENT,
    MELODY_INSTRUMENT,
    PITCH,
    POSITION,
    TICKS_PER_BEAT,
    TIME_SIGNATURE,
    NoteTable,
    arrangement_from_score,
    time_signature_of,
)

UNKNOWN = "unknown"
EIGHTH = TICKS_PER_BEAT // 2
FULL_OCCUPANCY = 0.9
SINGLE_NOTES = 0.75
CHORDS = 0.5
ON_BEAT_ONLY = 0.1  # at most this share of occupied eighths off the beat
OCTAVE = 12


@dataclasses.dataclass(frozen=True)
class StyleFeatures:
    """What the rules look at (means over the bars that have accompaniment)."""

    beats_per_bar: int
    bars: int
    onsets: int  # accompaniment onset groups
    occupancy: float  # share of a bar's eighth slots with an onset
    offbeat: float  # share of occupied eighth slots that are off the beat
    single: float  # share of onset groups with one pitch class
    chord: float  # share of onset groups with >= 3 pitch classes
    span: float  # median pitch span of a bar's accompaniment (semitones)


def _events(table: NoteTable | np.ndarray) -> np.ndarray:
    events = table.events if isinstance(table, NoteTable) else np.asarray(table)
    return np.asarray(events, dtype=np.int64).reshape(-1, 8)


def accompaniment(
    arrangement: NoteTable | np.ndarray, melody: NoteTable | np.ndarray | None = None
) -> np.ndarray:
    """The arrangement's non-drum notes minus the melody: without ``melody`` (a lead sheet; its
    instrument-0 notes are the melody) the notes below the corpus's melody register."""
    events = _events(arrangement)
    events = events[events[:, INSTRUMENT] != DRUM_INSTRUMENT]
    if melody is None:
        return events[events[:, PITCH] < corpus.MELODY_LOW]
    lead = _events(melody)
    lead = lead[lead[:, INSTRUMENT] == MELODY_INSTRUMENT]
    tune = {tuple(row) for row in lead[:, [BAR, POSITION, PITCH]].tolist()}
    keep = [tuple(row) not in tune for row in events[:, [BAR, POSITION, PITCH]].tolist()]
    return events[np.asarray(keep, dtype=bool)] if len(events) else events


def beats_per_bar(arrangement: NoteTable | np.ndarray) -> int:
    """The most common time signature's numerator (quarter-note beats per bar)."""
    codes = _events(arrangement)[:, TIME_SIGNATURE]
    if len(codes) == 0:
        return 4
    values, counts = np.unique(codes, return_counts=True)
    numerator, denominator = time_signature_of(int(values[np.argmax(counts)]))
    return max(1, round(numerator * 4 / denominator))


def style_features(
    arrangement: NoteTable | np.ndarray, melody: NoteTable | np.ndarray | None = None
) -> StyleFeatures:
    """The features of :func:`classify` (see the module docstring)."""
    beats = beats_per_bar(arrangement)
    notes = accompaniment(arrangement, melody)
    groups: dict[tuple[int, int], set[int]] = {}
    for bar, position, pitch in notes[:, [BAR, POSITION, PITCH]].tolist():
        groups.setdefault((bar, position), set()).add(pitch)
    slots: dict[int, set[int]] = {}
    for bar, position in groups:
        eighth = round(position / EIGHTH)
        if abs(position - eighth * EIGHTH) <= 1:  # off the eighth grid counts as no slot
            slots.setdefault(bar, set()).add(eighth)
    bars = sorted({bar for bar, _ in groups})
    occupied = [len(slots.get(bar, ())) / (2 * beats) for bar in bars]
    offbeat = sum(1 for bar in slots for e in slots[bar] if e % 2)
    total_slots = sum(len(s) for s in slots.values())
    classes = [len({p % OCTAVE for p in pitches}) for pitches in groups.values()]
    spans = [
        int(np.ptp(notes[notes[:, BAR] == bar, PITCH])) for bar in bars
    ]  # fmt: skip
    n = max(len(classes), 1)
    return StyleFeatures(
        beats_per_bar=beats,
        bars=len(bars),
        onsets=len(groups),
        occupancy=float(np.mean(occupied)) if occupied else 0.0,
        offbeat=offbeat / total_slots if total_slots else 0.0,
        single=sum(c == 1 for c in classes) / n,
        chord=sum(c >= 3 for c in classes) / n,
        span=float(np.median(spans)) if spans else 0.0,
    )


def decide(features: StyleFeatures) -> str:
    """The style the rules give for ``features`` (:data:`UNKNOWN` without accompaniment)."""
    if features.onsets == 0:
        return UNKNOWN
    if features.beats_per_bar == 3:
        return "waltz"
    if features.occupancy >= FULL_OCCUPANCY:
        if features.single >= SINGLE_NOTES:
            return "alberti" if features.span < OCTAVE else "ballad"
        if features.chord >= CHORDS:
            return "pop"
    if features.offbeat <= ON_BEAT_ONLY:
        return "stride"
    return "bossa"


def classify(
    arrangement: NoteTable | np.ndarray, melody: NoteTable | np.ndarray | None = None
) -> str:
    """The accompaniment style of an arrangement (a whole song or a window); ``melody``: the lead
    sheet (or just its melody) on the same bars, whose melody notes are left out."""
    return decide(style_features(arrangement, melody))


def windows(table: NoteTable, bars: int = 4, hop: int = 2) -> list[tuple[int, NoteTable]]:
    """(first bar, window) of the ``bars``-bar windows of a table every ``hop`` bars (SPEC 6.3's
    4-bar, 2-bar hop)."""
    if len(table) == 0:
        return []
    last = int(table.events[:, BAR].max())
    return [(b, table.bars(b, b + bars)) for b in range(0, max(last - bars + 2, 1), hop)]


def confusion_matrix(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> np.ndarray:
    """counts[i, j]: items of style ``labels[i]`` classified as ``labels[j]`` (last column:
    anything else)."""
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        counts[index[t], index.get(p, len(labels))] += 1
    return counts


def format_confusion(counts: np.ndarray, labels: Sequence[str]) -> str:
    width = max(len(x) for x in [*labels, "other"]) + 1
    head = " " * width + "".join(f"{x:>{width}}" for x in [*labels, "other"])
    rows = [
        f"{t:<{width}}" + "".join(f"{c:>{width}}" for c in row) for t, row in zip(labels, counts)
    ]
    return "\n".join([head, *rows])


def ground_truth(
    songs: int, *, seed: int = 0, bars: int = 16, styles: Sequence[str] = corpus.STYLES
) -> list[tuple[str, NoteTable, NoteTable]]:
    """(style, arrangement, lead sheet) tables of generated songs (no files, no audio)."""
    from bossa_jax.symbolic.leadsheet import leadsheet_from_score

    out = []
    for spec in corpus.song_specs(songs, seed=seed, styles=styles, bars=bars):
        scores = corpus.build_song(spec, seed)
        arrangement, _ = arrangement_from_score(scores.arrangement)
        lead = leadsheet_from_score(scores.leadsheet, spec.id).leadsheet
        out.append((spec.style, arrangement, lead))
    return out


def check(songs: int, *, seed: int = 0, bars: int = 16) -> dict[str, object]:
    """Accuracy and confusion matrices on ground truth: whole songs and 4-bar windows, with the
    melody given and without it."""
    data = ground_truth(songs, seed=seed, bars=bars)
    labels = list(corpus.STYLES)
    report: dict[str, object] = {}
    for name, with_melody, cut in (
        ("songs", True, False),
        ("songs, no melody given", False, False),
        ("4-bar windows", True, True),
        ("4-bar windows, no melody given", False, True),
    ):
        truth, predicted = [], []
        for style, arrangement, lead in data:
            if cut:
                pieces = [(w, lead.bars(b, b + 4)) for b, w in windows(arrangement)]
            else:
                pieces = [(arrangement, lead)]
            for table, melody in pieces:
                truth.append(style)
                predicted.append(classify(table, melody if with_melody else None))
        counts = confusion_matrix(truth, predicted, labels)
        accuracy = float(np.trace(counts[:, : len(labels)]) / max(len(truth), 1))
        report[name] = {"accuracy": accuracy, "items": len(truth), "confusion": counts}
    return report


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bossa_jax.data.style_classifier")
    parser.add_argument("--songs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bars", type=int, default=16)
    args = parser.parse_args(argv)
    report = check(args.songs, seed=args.seed, bars=args.bars)
    for name, result in report.items():
        print(f"{name}: accuracy {result['accuracy']:.3f} over {result['items']} items")
        print(format_confusion(result["confusion"], corpus.STYLES))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
