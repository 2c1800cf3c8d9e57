"""The style-transfer metrics of bench/mini_eval.py (bossa_jax/evaluate_style.py) on hand-built note
tables with known answers, and on ground-truth corpus arrangements (which keep the whole melody
and voice every accompaniment note on the chord)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bossa_jax import evaluate_style as es
from bossa_jax.data import style_classifier
from bossa_jax.symbolic.notes import CHORD_INSTRUMENT, DRUM_INSTRUMENT, MELODY_INSTRUMENT

FOUR_FOUR, THREE_FOUR = 9, 8  # time-signature codes


def note(bar, position, pitch, instrument=MELODY_INSTRUMENT, ts=FOUR_FOUR):
    return [bar, position, instrument, pitch, 12, 20, ts, 35]


def table(*rows):
    return np.array(rows, dtype=np.int64).reshape(-1, 8)


def chord(bar, position, pitches, ts=FOUR_FOUR):
    return [note(bar, position, p, CHORD_INSTRUMENT, ts) for p in pitches]


C, F, G = (48, 52, 55), (53, 57, 60), (55, 59, 62)
# melody D5 on the downbeat: a non-chord tone that must never count as accompaniment
LEADSHEET = table(
    note(0, 0, 74), note(0, 12, 74), note(0, 24, 76), note(1, 0, 77),
    *chord(0, 0, C), *chord(0, 24, G), *chord(1, 0, F),
)  # fmt: skip


def test_melody_preservation_counts_same_bar_position_and_pitch():
    arrangement = table(
        note(0, 0, 74), note(0, 13, 74), note(0, 24, 76), note(1, 0, 77),  # one a tick late
        note(0, 12, 75), note(0, 12, 128 + 74, DRUM_INSTRUMENT),  # wrong pitch; a drum
        note(0, 0, 36), note(1, 0, 41),
    )  # fmt: skip
    assert es.melody_preservation(arrangement, LEADSHEET) == pytest.approx(3 / 4)
    assert es.melody_preservation(LEADSHEET, LEADSHEET) == 1.0
    assert es.melody_preservation(table(note(0, 0, 36)), LEADSHEET) == 0.0
    assert math.isnan(es.melody_preservation(LEADSHEET, table(*chord(0, 0, C))))


def test_chord_tone_fraction_follows_the_chord_sounding_at_each_onset():
    arrangement = table(
        note(0, 0, 74),  # the melody: not accompaniment
        note(0, 0, 36),  # C under C: tone
        note(0, 12, 38),  # D under C: not
        note(0, 24, 43),  # G under G (second half of bar 0): tone
        note(0, 36, 47),  # B under G: tone
        note(1, 0, 45),  # A under F: tone
        note(1, 6, 40),  # E under F: not
        note(1, 6, 128 + 40, DRUM_INSTRUMENT),  # drums never count
    )
    fraction, counted = es.chord_tone_fraction(arrangement, LEADSHEET)
    assert counted == 6
    assert fraction == pytest.approx(4 / 6)


def test_chord_tone_fraction_holds_a_chord_over_later_bars_and_skips_notes_before_it():
    leadsheet = table(note(1, 0, 72), *chord(1, 0, C))
    arrangement = table(note(0, 0, 38), note(1, 0, 40), note(3, 12, 43), note(3, 12, 44))
    fraction, counted = es.chord_tone_fraction(arrangement, leadsheet)
    assert counted == 3  # bar 0 comes before the first chord
    assert fraction == pytest.approx(2 / 3)  # E and G of C (held over bar 3); G# is not
    assert math.isnan(es.chord_tone_fraction(table(note(0, 0, 72)), leadsheet)[0])


def test_bar_starts_follow_the_time_signature_and_carry_over_empty_bars():
    three = table(note(0, 0, 72, ts=THREE_FOUR), note(2, 0, 72, ts=THREE_FOUR))
    assert es.bar_starts([three], 4).tolist() == [0, 36, 72, 108, 144]
    assert es.bar_starts([table(note(0, 0, 72))], 2).tolist() == [0, 48, 96]
    # in 3/4 the chord of bar 1 starts at tick 36: a note at bar 0, position 36 would not exist,
    # a note at bar 1 position 0 hears the new chord
    leadsheet = table(
        note(0, 0, 76, ts=THREE_FOUR), *chord(0, 0, C, THREE_FOUR), *chord(1, 0, G, THREE_FOUR)
    )
    arrangement = table(note(0, 24, 52, ts=THREE_FOUR), note(1, 0, 59, ts=THREE_FOUR))
    assert es.chord_tone_fraction(arrangement, leadsheet) == (1.0, 2)


def test_jaccard_and_accompaniment_distances():
    assert es.jaccard_distance({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert es.jaccard_distance(set(), set()) == 0.0
    assert es.jaccard_distance({1}, set()) == 1.0
    melody = table(note(0, 0, 74), note(0, 24, 76))
    first = table(note(0, 0, 74), note(0, 24, 76), note(0, 0, 36), note(0, 24, 43))
    second = table(note(0, 0, 74), note(0, 24, 76), note(0, 0, 36), note(0, 12, 43))
    # with the melody removed: {36@0, 43@24} vs {36@0, 43@12} -> 1 - 1/3
    assert es.accompaniment_distance(first, second, melody) == pytest.approx(2 / 3)
    # the whole arrangements share the melody too: 1 - 3/5
    assert es.accompaniment_distance(first, second) == pytest.approx(2 / 5)
    assert es.accompaniment_distance(first, first, melody) == 0.0


def test_mean_pairwise():
    assert es.mean_pairwise([0.0, 1.0, 3.0], lambda a, b: abs(a - b)) == pytest.approx(2.0)
    assert math.isnan(es.mean_pairwise([1.0], lambda a, b: 0.0))


def test_ground_truth_arrangements_keep_the_melody_on_the_chords():
    """The corpus arrangements play the lead sheet's melody note for note and voice every
    accompaniment note on the bar's chord; texture distances separate the styles."""
    data = style_classifier.ground_truth(6, bars=8)
    by_style = {}
    for style, arrangement, lead in data:
        assert es.melody_preservation(arrangement, lead) == 1.0
        fraction, counted = es.chord_tone_fraction(arrangement, lead)
        assert fraction == 1.0 and counted > 20, style
        by_style[style] = (arrangement, lead)
    stride, lead = by_style["stride"]
    assert es.style_distance(stride, stride, lead) == 0.0
    assert es.style_distance(stride, by_style["pop"][0]) > 0.5  # melody: the notes above E4
    assert es.accompaniment_distance(stride, by_style["pop"][0]) > 0.5
