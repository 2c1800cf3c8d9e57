"""The rule-based style classifier (bossa_jax/data/style_classifier.py) on ground-truth
arrangements of the style corpus: whole songs and 4-bar windows, with and without the melody
given; and that it follows the rhythm, not the labels."""

from __future__ import annotations

import numpy as np

from bossa_jax.data import style_classifier as stc
from bossa_jax.data import style_corpus as sc
from bossa_jax.symbolic.leadsheet import read_leadsheet
from bossa_jax.symbolic.notes import BAR, POSITION, NoteTable, read_arrangement


def test_at_least_95_percent_right_on_ground_truth(capsys):
    report = stc.check(30, seed=11, bars=8)
    with capsys.disabled():  # the confusion matrices, for the record
        for name, result in report.items():
            print(f"\n{name}: accuracy {result['accuracy']:.3f} over {result['items']} items")
            print(stc.format_confusion(result["confusion"], sc.STYLES))
    for name, result in report.items():
        assert result["accuracy"] >= 0.95, name
        assert result["items"] >= 30
    # every style is present among the 30 songs and is recognised at least once
    songs = report["songs"]["confusion"]
    assert np.all(np.diag(songs[:, : len(sc.STYLES)]) > 0)


def test_it_follows_the_rhythm_not_the_label():
    (style, arrangement, lead), *_ = stc.ground_truth(1, seed=3, bars=8, styles=("stride",))
    assert style == "stride" and stc.classify(arrangement, lead) == "stride"
    # the same notes pushed one eighth late: syncopated, half the eighths empty -> bossa
    events = arrangement.events.copy()
    events[:, POSITION] += 6
    spill = events[:, POSITION] >= 48
    events[spill, POSITION] -= 48
    events[spill, BAR] += 1
    assert stc.classify(events) == "bossa"
    assert stc.classify(NoteTable()) == stc.UNKNOWN


def test_reads_the_corpus_midi_files(tmp_path):
    sc.make_corpus(tmp_path / "c", songs=6, bars=4, seed=2, audio=False)
    for spec in sc.song_specs(6, seed=2, bars=4):
        arrangement = read_arrangement(tmp_path / "c" / "arrangements" / f"{spec.id}.mid")
        lead = read_leadsheet(tmp_path / "c" / "leadsheets" / f"{spec.id}.mid")
        assert stc.classify(arrangement.arrangement, lead.leadsheet) == spec.style
