"""The style-transfer metrics of bench/mini_eval.py (bossa_jax/evaluate_style.py) on hand-built note
tables with known answers, and on ground-truth corpus arrangements (which keep the whole melody
and voice every accompaniment note on the chord)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

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


# --- bench/mini_eval.py's plumbing with a stand-in arranger -------------------------------------
class _Stub:
    pass


class ScriptedArranger:
    """Stands in for bossa_jax.arrange.Arranger: "arranges" a request as the lead sheet's melody
    over the ground-truth accompaniment of the song whose audio it was given. The style prefix
    of song i is the number i, so a ``prefix_fn`` that moves or silences the queries (-1) decides
    whose accompaniment a song gets (none: the melody alone)."""

    def __init__(self, corpus_dir, songs_per_batch=4):
        from bossa_jax.symbolic.notes import read_arrangement

        self.corpus_dir = corpus_dir
        self.read_arrangement = read_arrangement
        self.options = _Stub()
        self.options.songs_per_batch = songs_per_batch
        self.config = _Stub()
        self.config.audio = _Stub()
        self.config.audio.clip_frames = 8
        self.model = _Stub()
        self.model.cfg = _Stub()
        self.model.cfg.encoder_width = 2
        self.model.style_prefix = lambda mask, features: np.full((1, 1, 1), -1.0)

    def __call__(self, requests, *, seed=0, progress=None, prefix_fn=None):
        from bossa_jax.symbolic import remi
        from bossa_jax.symbolic.notes import PITCH

        out = []
        group = self.options.songs_per_batch
        for start in range(0, len(requests), group):
            batch = requests[start : start + group]
            prefix = np.arange(len(batch), dtype=np.float32)[:, None, None]
            if prefix_fn is not None:
                prefix = prefix_fn(prefix)
            for request, source in zip(batch, prefix[:, 0, 0].tolist(), strict=True):
                first, last = request.bars
                melody = es.melody_of(request.leadsheet.leadsheet.bars(first, last).events)
                events = melody
                if source >= 0:
                    donor = batch[int(source)].audio
                    ref = Path(donor).parent.parent / "arrangements" / f"{Path(donor).stem}.mid"
                    acc = self.read_arrangement(ref).arrangement.bars(first, last).events
                    events = np.concatenate([melody, acc[acc[:, PITCH] < 65]])
                arrangement = _Stub()
                order = np.lexsort((-events[:, 3], events[:, 2], events[:, 1], events[:, 0]))
                arrangement.tokens = remi.encode(events[order])
                arrangement.generated_tokens = len(arrangement.tokens)
                arrangement.windows = [None]
                out.append(arrangement)
        return out


def test_mini_eval_style_and_control_sections_with_a_scripted_arranger(tmp_path):
    import json
    import sys

    from bossa_jax.data import style_corpus

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import mini_eval

    root = tmp_path / "corpus"
    style_corpus.make_corpus(root, songs=36, bars=4, audio=False)  # all 6 held out
    lines = []
    for line in (root / "manifest.jsonl").read_text().splitlines():  # audio paths, no audio
        entry = json.loads(line)
        lines.append(json.dumps({**entry, "audio": f"audio/{entry['id']}.flac"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    budget = dataclasses.replace(mini_eval.QUICK, bars=4, songs_per_style=1)
    requests, items = mini_eval.style_requests(root, budget)
    assert len(requests) == 36 and sum(it["paired"] for it in items) == 6
    arranger = ScriptedArranger(root)

    style, _ = mini_eval.style_section(arranger, requests, items, seed=0)
    for part in ("paired", "unpaired", "all"):
        assert style[part]["style_accuracy"] == 1.0  # the accompaniment of the given audio
        assert style[part]["melody_preservation"] == 1.0
    assert style["paired"]["chord_tone_fraction"] == 1.0  # its own chords
    assert style["all"]["style_accuracy_items"] == 5 * 5 + 1  # 4/4 with 4/4, waltz with waltz
    assert style["unpaired"]["chord_tone_fraction"] < 0.9  # another song's chords

    control = mini_eval.control_section(arranger, requests, items, seed=0)
    assert control["silent"]["style_accuracy"] == 0.0  # no accompaniment: "unknown"
    shuffled = control["shuffled"]
    assert shuffled["every_batch_held_whole_groups"]
    assert shuffled["follows_given_queries"] == 1.0 and shuffled["style_accuracy"] < 0.5
    table = mini_eval.table({"style": style, "control": control})
    assert "| style accuracy, paired (meter-compatible, n=6) | 1.000 |" in table
    json.dumps(mini_eval.clean({"style": style, "control": control}))  # JSON-safe
    locked = mini_eval.table({"style": style, "melody_lock": True, "style_model_alone": style})
    assert "| style accuracy, melody lock, paired (meter-compatible, n=6) | 1.000 |" in locked
    assert "| melody preservation, synthetic held-out, melody lock | 1.000 | (placed by" in locked
    alone = "| melody preservation, synthetic held-out, model alone | 1.000 | >= 0.90 | met |"
    assert alone in locked


def test_model_alone_turns_the_melody_lock_off_for_its_block():
    import sys
    from types import SimpleNamespace

    from bossa_jax.config import ArrangeConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import mini_eval

    arranger = SimpleNamespace(options=ArrangeConfig(melody_lock=True))
    with mini_eval.model_alone(arranger):
        assert arranger.options.melody_lock is False
    assert arranger.options.melody_lock is True
