"""The teacher-forced melody probe of bench/stage0_scale.py (issue 11): which arrangement pitch
tokens count as lead-sheet melody notes, and the argmax accuracy over them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bossa_jax.data import readers, style_corpus
from bossa_jax.evaluate_style import melody_of
from bossa_jax.symbolic import remi, segment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import stage0_scale  # noqa: E402


def corpus_window(tmp_path):
    root = tmp_path / "corpus"
    manifest = style_corpus.make_corpus(root, songs=6, bars=8, audio=False)
    sources, _ = readers.manifest_sources(manifest)
    records, _ = readers.read_songs(sources, require_audio=False)
    return segment.segment_song(records[0].song)[1]


def test_melody_positions_are_the_lead_sheet_melody_in_the_arrangement(tmp_path):
    window = corpus_window(tmp_path)
    ids, control, pad = remi.stage2_sequence(window.arrangement, window.leadsheet, max_tokens=768)
    melody, accompaniment = stage0_scale._melody_positions(ids, control, pad, window.leadsheet)
    tokens = remi.to_strings(ids)
    pitches = {int(tokens[t][2:]) for t in melody}
    assert all(tokens[t].startswith("p-") for t in [*melody, *accompaniment])
    assert min(melody) > int(control.sum())  # never a prompt token
    # the corpus's arrangements play every melody note: one pitch token each (distinct onsets)
    lead = melody_of(window.leadsheet)
    assert len(melody) == len(lead) and pitches == set(lead[:, 3].tolist())
    arrangement_pitches = sum(t.startswith("p-") for t in tokens[int(control.sum()) :])
    assert len(melody) + len(accompaniment) == arrangement_pitches


def test_teacher_forced_accuracy_scores_the_prediction_for_each_position(tmp_path):
    window = corpus_window(tmp_path)
    ids, control, pad = remi.stage2_sequence(window.arrangement, window.leadsheet, max_tokens=768)
    melody, accompaniment = stage0_scale._melody_positions(ids, control, pad, window.leadsheet)
    data = {
        "eval_tokens": ids[None].astype(np.int16),
        "eval_pad": pad[None],
        "melody_positions": np.stack([np.zeros_like(melody), melody], 1),
        "accompaniment_positions": np.stack([np.zeros_like(accompaniment), accompaniment], 1),
    }

    def perfect(params, tokens, pad):  # the prediction at t - 1 is the token at t
        return np.roll(tokens, -1, axis=1)

    def melody_wrong(params, tokens, pad):
        predicted = perfect(params, tokens, pad)
        predicted[0, melody - 1] = remi.PAD
        return predicted

    result = stage0_scale.teacher_forced(perfect, None, data)
    assert result["melody_pitch_accuracy"] == result["accompaniment_pitch_accuracy"] == 1.0
    result = stage0_scale.teacher_forced(melody_wrong, None, data)
    assert result["melody_pitch_accuracy"] == 0.0
    assert result["accompaniment_pitch_accuracy"] == 1.0
    assert result["melody_pitch_tokens"] == len(melody)
