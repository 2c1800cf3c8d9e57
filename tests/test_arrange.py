"""Windowed arrangement (bossa_jax/arrange.py; SPEC 8.2, 10.19, 11.11-11.14; issue 10 item 2).

The window, prompt, carry and stitch logic runs against a scripted sampler whose window w emits the
bars B(w, 0), B(w, 1), ... (one note each, pitch 40 + 10 w + j) under the real stop rules, so
every expected token sequence is written out by hand here. The real tiny model (mel front end,
random weights) checks batching, seeds, 1 vs 8 devices, audio clips and checkpoints.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pretty_midi
import pytest
import soundfile
import symusic
from flax import nnx

from bossa_jax import arrange, audio, mel, sharding
from bossa_jax.arrange import Arranger, SongRequest
from bossa_jax.assets import DEMO_LEADSHEET
from bossa_jax.config import load_config
from bossa_jax.errors import AudioError, BossaError, ConfigError, DataError
from bossa_jax.models.arranger import Stage2Model
from bossa_jax.sampling import STOP_BARS, STOP_EOS, STOP_LENGTH, Samples
from bossa_jax.symbolic import remi
from bossa_jax.symbolic.leadsheet import read_leadsheet
from bossa_jax.symbolic.notes import BAR, Song
from tests.mel_config import mel_overrides

N_MELS = 32  # = the tiny MusicGen's width: one model serves both front ends
MEL = mel_overrides(N_MELS)
V = remi.VOCAB
B1 = remi.BAR_END
EOS = remi.EOS


def config(*overrides: str):
    return load_config("tiny", [*MEL, *overrides])


@pytest.fixture(scope="module")
def leadsheet() -> Song:
    return read_leadsheet(DEMO_LEADSHEET)  # 16 bars of 4/4 at 112 bpm, every bar has notes


@pytest.fixture(scope="module")
def model() -> Stage2Model:
    cfg = config()
    return sharding.create_sharded(
        lambda: Stage2Model(cfg.qformer, cfg.musecoco, cfg.musicgen, rngs=nnx.Rngs(0))
    )


def tone(path, seconds: float, rate: int = audio.SAMPLE_RATE, freq: float = 220.0):
    t = np.arange(round(seconds * rate)) / rate
    y = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t))
    soundfile.write(str(path), y.astype(np.float32), rate, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tone(tmp_path_factory.mktemp("audio") / "ref.wav", 14.0)


# --- the scripted sampler ---------------------------------------------------------------------
def bar(window: int, j: int) -> list[int]:
    """Bar j sampled in window ``window``: one quarter note of pitch 40 + 10 window + j."""
    return [V["s-9"], V["t-35"], V["o-0"], V["i-0"], V[f"p-{40 + 10 * window + j}"], V["d-11"]] + [
        V["v-20"],
        B1,
    ]


class ScriptedSampler:
    """Stands in for :class:`bossa_jax.sampling.Sampler`: the row with sequence id w draws
    ``stream(w)`` token after token under the sampler's stop rules (``</s>`` and the bar limit
    stop without being appended, ``max_new_tokens`` caps). Records every call."""

    def __init__(self, cfg, stream=None):
        self.cfg = cfg
        self.stream = stream or (lambda w: [t for j in range(12) for t in bar(w, j)])
        self.calls = []

    def __call__(self, prompts, *, max_new_tokens, seed, sequence_ids, bar_limit, **kw):
        self.calls.append(
            dict(
                prompts=[np.asarray(p) for p in prompts],
                max_new=list(max_new_tokens),
                bar_limit=list(bar_limit),
                ids=list(sequence_ids),
                prefix=kw["prefix_embeddings"],
                position_start=kw["position_start"],
                melody_lock=kw.get("melody_lock"),
            )
        )
        rows, counts, reasons = [], [], []
        for limit, cap, w in zip(bar_limit, max_new_tokens, sequence_ids, strict=True):
            out, bars, reason = [], 0, STOP_LENGTH
            for token in self.stream(w):
                if len(out) >= cap:
                    break
                if token == EOS:
                    reason = STOP_EOS
                    break
                if token == B1:
                    bars += 1
                    if bars >= limit:
                        reason = STOP_BARS
                        break
                out.append(token)
            rows.append(out)
            counts.append(len(out))
            reasons.append(reason)
        generated = np.full((len(prompts), max(max(counts), 1)), remi.PAD, np.int32)
        for i, r in enumerate(rows):
            generated[i, : len(r)] = r
        return Samples(
            [np.asarray(p) for p in prompts], generated, np.array(counts), np.array(reasons)
        )


def scripted(model, *overrides, stream=None):
    arranger = Arranger(model, config(*overrides))
    arranger.sampler = ScriptedSampler(arranger.sampler.cfg, stream)
    return arranger


def lead_prompt(song: Song, start: int, end: int) -> np.ndarray:
    return remi.prompt(song.leadsheet.bars(start, end))


def cat(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int64) for p in parts])


# --- pure logic -------------------------------------------------------------------------------
def test_window_plan():
    assert arrange.plan_windows(16) == [
        (0, 4),
        (2, 6),
        (4, 8),
        (6, 10),
        (8, 12),
        (10, 14),
        (12, 16),
    ]
    assert arrange.plan_windows(15)[-1] == (12, 15) and len(arrange.plan_windows(15)) == 7
    assert arrange.plan_windows(17)[-1] == (14, 17) and len(arrange.plan_windows(17)) == 8
    assert arrange.plan_windows(4) == [(0, 4)]
    assert arrange.plan_windows(3) == [(0, 3)]
    assert arrange.plan_windows(5) == [(0, 4), (2, 5)]
    assert arrange.plan_windows(1) == [(0, 1)]


def test_carry_and_stitch_rules():
    r = cat(bar(0, 0), bar(0, 1), bar(0, 2), bar(0, 3))
    np.testing.assert_array_equal(arrange.next_carry(r), cat(bar(0, 2), bar(0, 3)))
    cut = r[:-1]  # the official result: the 4th b-1 was never appended
    np.testing.assert_array_equal(
        arrange.next_carry(cut, official_carry=True), cat(bar(0, 2), bar(0, 3)[:-2])
    )
    assert len(arrange.next_carry(cat(bar(0, 0)))) == 0  # fewer than 2 b-1: no carry
    parts = [r, cat(bar(1, 0), bar(1, 1), bar(1, 2)), cat(bar(2, 0))]
    np.testing.assert_array_equal(
        arrange.stitch(parts), cat(bar(0, 0), bar(0, 1), bar(1, 0), bar(1, 1), bar(2, 0))
    )


# --- windows, prompts, carries, stops with the scripted sampler --------------------------------
def test_default_windows_stop_at_their_lead_sheet_and_keep_complete_bars(
    model, leadsheet, reference
):
    arranger = scripted(model)
    (piece,) = arranger([SongRequest("demo", leadsheet, reference, bars=(0, 16))], seed=3)
    calls = arranger.sampler.calls
    assert len(calls) == 7 and all(len(c["prompts"]) == 1 for c in calls)
    assert [c["bar_limit"][0] for c in calls] == [4, 2, 2, 2, 2, 2, 2]
    assert [c["ids"][0] for c in calls] == list(range(7))
    assert all(c["position_start"] == 61 for c in calls)
    # window 0: the lead sheet of bars 0-3 alone; window w: bars 2w..2w+3 + the carried bars
    np.testing.assert_array_equal(calls[0]["prompts"][0], lead_prompt(leadsheet, 0, 4))
    np.testing.assert_array_equal(
        calls[1]["prompts"][0], cat(lead_prompt(leadsheet, 2, 6), bar(0, 2), bar(0, 3))
    )  # SPEC 10.19 fixed: the carry ends with its b-1, no token dropped
    np.testing.assert_array_equal(
        calls[2]["prompts"][0], cat(lead_prompt(leadsheet, 4, 8), bar(1, 0), bar(1, 1))
    )
    np.testing.assert_array_equal(
        piece.windows[1].result, cat(bar(0, 2), bar(0, 3), bar(1, 0), bar(1, 1))
    )
    expected = cat(
        bar(0, 0), bar(0, 1), bar(0, 2), bar(0, 3),
        *[t for w in range(1, 7) for t in (bar(w, 0), bar(w, 1))],
    )  # fmt: skip
    np.testing.assert_array_equal(piece.tokens, expected)
    assert piece.bars == 16 and piece.notes == 16
    assert piece.generated_tokens == 4 * 8 + 6 * 2 * 8  # 8 tokens a bar, stopping b-1 included
    pitches = [n.pitch for n in piece.score.tracks[0].notes]
    assert pitches == [40, 41, 42, 43] + [40 + 10 * w + j for w in range(1, 7) for j in (0, 1)]


def test_melody_lock_gets_each_windows_melody_and_its_first_sampled_bar(
    model, leadsheet, reference
):
    plain = scripted(model)
    plain([SongRequest("demo", leadsheet, reference, bars=(0, 8))])
    assert plain.sampler.calls and all(c["melody_lock"] is None for c in plain.sampler.calls)
    arranger = scripted(model, "arrange.melody_lock=true")
    arranger([SongRequest("demo", leadsheet, reference, bars=(1, 9))])
    calls = arranger.sampler.calls
    assert len(calls) == 3
    for k, call in enumerate(calls):  # windows at bars 1+0, 1+2, 1+4 of the lead sheet
        lock = call["melody_lock"]
        pitch, duration = remi.melody_table(leadsheet.leadsheet, 1 + 2 * k, 4)
        np.testing.assert_array_equal(lock.pitch, pitch[None])
        np.testing.assert_array_equal(lock.duration, duration[None])
        assert lock.first_bar.tolist() == [0 if k == 0 else 2]  # the carried bars come first
        assert (pitch >= 0).sum() > 0


def test_odd_bar_counts_end_at_the_requested_bar(model, leadsheet, reference):
    arranger = scripted(model)
    pieces = arranger(
        [
            SongRequest("a", leadsheet, reference, bars=(3, 8)),  # 5 bars: windows 0-3, 2-4
            SongRequest("b", leadsheet, reference, bars=(0, 3)),  # one 3-bar window
        ]
    )
    calls = arranger.sampler.calls
    assert [c["bar_limit"] for c in calls] == [[4, 3], [1]]
    np.testing.assert_array_equal(calls[0]["prompts"][1], lead_prompt(leadsheet, 0, 3))
    np.testing.assert_array_equal(
        calls[1]["prompts"][0], cat(lead_prompt(leadsheet, 5, 8), bar(0, 2), bar(0, 3))
    )
    np.testing.assert_array_equal(
        pieces[0].tokens, cat(bar(0, 0), bar(0, 1), bar(0, 2), bar(0, 3), bar(1, 0))
    )
    assert [p.bars for p in pieces] == [5, 3] and [p.first_bar for p in pieces] == [3, 0]


def test_official_overrun_and_carry(model, leadsheet, reference):
    """SPEC 8.2 / 10.19 / 11.12 with both official options: every window stops at its 4th sampled
    b-1 (not appended), the carry is the official slice (end index -1 after window 0), the last
    window is kept whole."""
    arranger = scripted(model, "arrange.official_overrun=true", "arrange.official_carry=true")
    (piece,) = arranger([SongRequest("demo", leadsheet, reference, bars=(0, 8))])
    calls = arranger.sampler.calls
    assert [c["bar_limit"][0] for c in calls] == [4, 4, 4]
    result0 = cat(bar(0, 0), bar(0, 1), bar(0, 2), bar(0, 3)[:-1])
    np.testing.assert_array_equal(piece.windows[0].result, result0)
    carry1 = cat(bar(0, 2), bar(0, 3)[:-2])  # the last generated token (v-20) is dropped
    np.testing.assert_array_equal(calls[1]["prompts"][0], cat(lead_prompt(leadsheet, 2, 6), carry1))
    result1 = cat(carry1, bar(1, 0), bar(1, 1), bar(1, 2), bar(1, 3)[:-1])
    np.testing.assert_array_equal(piece.windows[1].result, result1)
    carry2 = cat(bar(1, 1), bar(1, 2))  # after its 2nd b-1 through its 4th
    np.testing.assert_array_equal(calls[2]["prompts"][0], cat(lead_prompt(leadsheet, 4, 8), carry2))
    result2 = cat(carry2, bar(2, 0), bar(2, 1), bar(2, 2), bar(2, 3)[:-1])
    np.testing.assert_array_equal(
        piece.tokens, cat(bar(0, 0), bar(0, 1), carry1, bar(1, 0), result2)
    )
    assert piece.bars == 2 + 2 + 6  # 8 requested, 2 more sampled past the lead sheet (SPEC 11.12)


def test_official_overrun_alone_keeps_complete_bars(model, leadsheet, reference):
    arranger = scripted(model, "arrange.official_overrun=true")
    (piece,) = arranger([SongRequest("demo", leadsheet, reference, bars=(0, 6))])
    calls = arranger.sampler.calls
    np.testing.assert_array_equal(
        calls[1]["prompts"][0], cat(lead_prompt(leadsheet, 2, 6), bar(0, 2), bar(0, 3))
    )
    assert piece.bars == 8 and len(piece.windows[1].result) == 6 * len(bar(0, 0))


def test_official_carry_alone_still_ends_at_the_requested_bar(model, leadsheet, reference):
    """SPEC 10.19 kept (stopping b-1 dropped, carry end -1), our stops: a window's bar limit
    counts the carry's complete bars, so its first b-1 closes the carried unfinished bar."""
    arranger = scripted(model, "arrange.official_carry=true")
    (piece,) = arranger([SongRequest("demo", leadsheet, reference, bars=(0, 8))])
    calls = arranger.sampler.calls
    assert [c["bar_limit"][0] for c in calls] == [4, 3, 3]
    carry1 = cat(bar(0, 2), bar(0, 3)[:-2])
    np.testing.assert_array_equal(calls[1]["prompts"][0], cat(lead_prompt(leadsheet, 2, 6), carry1))
    carry2 = cat(bar(1, 1), bar(1, 2)[:-2])
    np.testing.assert_array_equal(calls[2]["prompts"][0], cat(lead_prompt(leadsheet, 4, 8), carry2))
    last = cat(carry2, bar(2, 0), bar(2, 1), bar(2, 2)[:-1])
    np.testing.assert_array_equal(piece.tokens, cat(bar(0, 0), bar(0, 1), carry1, bar(1, 0), last))
    assert piece.bars == 8


def test_early_stops_give_defined_bars(model, leadsheet, reference):
    """SPEC 11.11: a window that ends early (</s> after one bar; max tokens inside a bar) is
    completed with empty bars, so the carry and the piece keep the bar grid."""

    def stream(w):
        if w == 0:
            return bar(0, 0) + [EOS] + bar(0, 1)
        return [t for j in range(4) for t in bar(w, j)]

    arranger = scripted(model, stream=stream)
    (piece,) = arranger([SongRequest("demo", leadsheet, reference, bars=(0, 6))])
    calls = arranger.sampler.calls
    np.testing.assert_array_equal(piece.windows[0].result, cat(bar(0, 0), [B1, B1, B1]))
    np.testing.assert_array_equal(
        calls[1]["prompts"][0], cat(lead_prompt(leadsheet, 2, 6), [B1, B1])
    )
    assert calls[1]["bar_limit"] == [2]
    assert piece.windows[0].stop_reason == STOP_EOS and piece.bars == 6

    capped = scripted(model, "arrange.max_new_tokens=11")  # one bar + 3 tokens of the next
    (piece,) = capped([SongRequest("demo", leadsheet, reference, bars=(0, 4))])
    np.testing.assert_array_equal(
        piece.windows[0].result, cat(bar(0, 0), bar(0, 1)[:3], [B1, B1, B1])
    )
    assert piece.windows[0].stop_reason == STOP_LENGTH and piece.bars == 4


def test_first_window_without_lead_sheet_notes(model, leadsheet, reference):
    """The official code fails here (SPEC 11.11); ours prompts with the empty lead sheet."""
    late = dataclasses.replace(leadsheet, leadsheet=leadsheet.leadsheet.select(
        leadsheet.leadsheet.events[:, BAR] >= 4
    ))  # fmt: skip
    arranger = scripted(model)
    (piece,) = arranger([SongRequest("late", late, reference, bars=(0, 8))])
    prompt0 = arranger.sampler.calls[0]["prompts"][0]
    np.testing.assert_array_equal(prompt0, cat(remi.PROMPT_PREFIX_IDS, [remi.SEP]))
    assert piece.bars == 8


def test_bar_count_and_meter_of_the_midi(model, leadsheet, reference, tmp_path):
    """The decoded piece lasts exactly the requested bars (pretty_midi's downbeats), with the
    lead sheet's tempo and time signature, whatever the model samples for them."""

    def stream(w):  # 3/4 and 60 bpm sampled, a note far too long, bar 2 empty
        bars = [
            [V["s-8"], V["t-20"], V["o-0"], V["i-0"], V["p-60"], V["d-95"], V["v-20"], B1],
            [V["s-8"], V["t-20"], V["o-12"], V["i-0"], V["p-62"], V["d-11"], V["v-30"], B1],
            [B1],
            [V["s-8"], V["t-20"], V["o-0"], V["i-0"], V["p-64"], V["d-11"], V["v-20"], B1],
        ]
        return [t for b in bars for t in b]

    for pedal in (False, True):
        arranger = scripted(model, f"arrange.pedal={str(pedal).lower()}", stream=stream)
        (piece,) = arranger([SongRequest("demo", leadsheet, reference, bars=(4, 14))])
        path = piece.write_midi(tmp_path / f"p{pedal}.mid")
        pm = pretty_midi.PrettyMIDI(str(path))
        assert piece.bars == 10 and len(pm.get_downbeats()) == 10
        assert pm.time_signature_changes[0].numerator == 4
        assert abs(pm.get_tempo_changes()[1][0] - 112) < 4  # the lead sheet's tempo code
        bar_seconds = 4 * 60 / pm.get_tempo_changes()[1][0]
        assert pm.get_end_time() == pytest.approx(10 * bar_seconds, abs=0.01)
        assert max(n.end for n in pm.instruments[0].notes) <= 10 * bar_seconds + 1e-6
        notes = sorted(pm.instruments[0].notes, key=lambda n: n.start)
        assert [n.velocity for n in notes][:2] == [82, 122]  # 4 v + 2: velocities kept
        values = {c.value for c in pm.instruments[0].control_changes if c.number == 64}
        assert values == ({0, 72} if pedal else {0})  # the end marker is a sustain-off


def test_a_piece_without_notes_still_lasts_its_bars(model, leadsheet, reference, tmp_path):
    """Readers drop a track without notes; the end marker and lyric keep the piece's length."""
    arranger = scripted(model, stream=lambda w: [B1] * 4)
    (piece,) = arranger([SongRequest("demo", leadsheet, reference, bars=(0, 6))])
    assert piece.notes == 0
    path = piece.write_midi(tmp_path / "empty.mid")
    assert len(pretty_midi.PrettyMIDI(str(path)).get_downbeats()) == 6
    score = symusic.Score(str(path))
    assert score.end() == pytest.approx(6 * 4 * score.ticks_per_quarter, abs=1)


# --- audio clips ------------------------------------------------------------------------------
def test_clips_are_centred_on_the_lead_sheet_and_equal_the_training_features(
    model, leadsheet, reference
):
    cfg = config()
    arranger = Arranger(model, cfg)
    prepared = arranger.prepare(SongRequest("demo", leadsheet, reference, bars=(2, 10)))
    db = leadsheet.downbeat_times
    for (start, end), clip in zip(prepared.windows, prepared.clips, strict=True):
        centre = int(round(((db[2 + start] + db[2 + end]) * 50) // 2))
        assert clip == audio.clip_placement(centre, 700, 508)  # 14 s = 700 frames, clamped
        _, _, feats = arranger._clip_inputs([prepared], prepared.windows.index((start, end)), 1)
        expected, _ = mel.file_features(reference, cfg, centre_frame=clip[0] + 254)
        np.testing.assert_allclose(feats[0], expected, atol=1e-5)


def test_short_audio_is_padded_and_masked(model, leadsheet, tmp_path):
    short = tone(tmp_path / "short.wav", 4.0)
    arranger = Arranger(model, config())
    prepared = arranger.prepare(SongRequest("demo", leadsheet, short, bars=(0, 6)))
    assert prepared.clips == [(0, 200), (0, 200)]
    mask, _, feats = arranger._clip_inputs([prepared], 0, 2)
    np.testing.assert_array_equal(mask[0], audio.clip_mask(200, 508))
    assert not mask[1].any() and not feats[1].any()  # a padding row


# --- the real model: batching, seeds, devices, checkpoints --------------------------------------
def _songs(leadsheet, reference, tmp_path):
    other = tone(tmp_path / "other.wav", 9.0, freq=330.0)
    return [
        SongRequest("a", leadsheet, reference, bars=(6, 14)),  # 3 windows
        SongRequest("b", leadsheet, other, bars=(4, 9)),  # 2 windows, a short reference
    ]


def test_batched_songs_get_the_tokens_they_get_alone(model, leadsheet, reference, tmp_path):
    arranger = Arranger(model, config("arrange.max_new_tokens=12"))
    songs = _songs(leadsheet, reference, tmp_path)
    ticks = []
    together = arranger(songs, seed=5, progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(2, 5), (4, 5), (5, 5)]  # 3 + 2 windows
    for song, piece in zip(songs, together, strict=True):
        (alone,) = arranger([song], seed=5)
        np.testing.assert_array_equal(piece.tokens, alone.tokens)
        assert piece.bars == song.bars[1] - song.bars[0]
    assert not np.array_equal(together[0].tokens, arranger(songs[:1], seed=6)[0].tokens)


def test_same_midi_on_one_and_eight_devices(model, leadsheet, reference, tmp_path):
    cfg = config("arrange.max_new_tokens=12", "arrange.pedal=true")
    songs = _songs(leadsheet, reference, tmp_path)
    single = Arranger(model, cfg)(songs, seed=9)
    mesh = sharding.make_mesh(load_config(None).mesh)
    assert mesh.shape["data"] == 8
    sharded = Arranger(model, cfg, mesh=mesh)(songs, seed=9)
    for a, b in zip(single, sharded, strict=True):
        assert a.score.dumps_midi() == b.score.dumps_midi()


def test_prefix_fn_sees_the_projected_queries(model, leadsheet, reference, tmp_path):
    arranger = Arranger(model, config("arrange.max_new_tokens=6"))
    arranger.sampler = ScriptedSampler(arranger.sampler.cfg)
    seen = []

    def zero(prefix):
        seen.append(prefix.shape)
        return np.zeros_like(prefix)

    arranger(_songs(leadsheet, reference, tmp_path)[:2], prefix_fn=zero)
    cfg = config()
    assert seen[0] == (2, cfg.qformer.num_query_tokens, cfg.musecoco.hidden_size)
    assert not np.asarray(arranger.sampler.calls[0]["prefix"]).any()
    with pytest.raises(ValueError, match="prefix_fn"):
        arranger(_songs(leadsheet, reference, tmp_path)[:1], prefix_fn=lambda p: p[:, :1])


def test_from_checkpoint_with_its_run_config(model, leadsheet, reference, tmp_path):
    cfg = config("arrange.max_new_tokens=8")
    path = arrange.save_arranger(tmp_path / "ckpt", model, cfg)
    loaded = Arranger.from_checkpoint(path)
    assert loaded.config == cfg and loaded.frontend == "mel"
    song = SongRequest("a", leadsheet, reference, bars=(0, 4))
    np.testing.assert_array_equal(
        loaded([song], seed=1)[0].tokens, Arranger(model, cfg)([song], seed=1)[0].tokens
    )
    (path / arrange.RUN_CONFIG_FILE).unlink()  # then: the defaults with the model's sections
    derived = arrange.read_run_config(path)
    assert derived.audio.frontend == "musicgen" and derived.musicgen == cfg.musicgen
    with pytest.raises(ConfigError, match="arrange.encodec_checkpoint"):
        Arranger.from_checkpoint(path)  # musicgen front end, no EnCodec anywhere
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("name: bossa_stage2\nmusicgen: null\n")
    with pytest.raises(ConfigError, match="no run_config.yaml and no MusicGen"):
        arrange.read_run_config(bare)


# --- errors -----------------------------------------------------------------------------------
def test_bad_requests_are_one_line_errors(model, leadsheet, reference, tmp_path):
    arranger = Arranger(model, config())
    silent = tmp_path / "silent.wav"
    soundfile.write(str(silent), np.zeros(32000 * 3, np.float32), 32000)
    cases = [
        (SongRequest("x", leadsheet, reference, bars=(10, 30)), DataError, "outside"),
        (SongRequest("x", leadsheet, reference, bars=(5, 5)), DataError, "outside"),
        (SongRequest("x", leadsheet, tmp_path / "missing.wav"), AudioError, "not found"),
        (SongRequest("x", leadsheet, silent), AudioError, "silent"),
        (
            SongRequest(
                "x", dataclasses.replace(leadsheet, leadsheet=leadsheet.arrangement), reference
            ),
            DataError,
            "no notes",
        ),
    ]
    for request, kind, says in cases:
        with pytest.raises(kind, match=says) as err:
            arranger([request])
        assert "\n" not in str(err.value) and isinstance(err.value, BossaError)
    with pytest.raises(ConfigError, match="n_mels"):
        Arranger(
            model,
            load_config("tiny", [*MEL[:1], "audio.n_mels=8", "qformer.encoder_width=8", MEL[3]]),
        )
    cfg = load_config("tiny")
    no_musicgen = nnx.eval_shape(
        lambda: Stage2Model(cfg.qformer, cfg.musecoco, None, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ConfigError, match="no MusicGen"):
        Arranger(no_musicgen, cfg)


def test_musicgen_front_end_encodes_the_whole_file_once_and_cuts_codes(model, leadsheet, tmp_path):
    """Front end ``musicgen``: the file's codes come from fixed-chunk encoding of the whole file
    (as the codes store), each window's clip is cut from them, padded with the special id, and
    MusicGen runs inside the style prefix."""
    from bossa_jax.data.codes import chunked_encoder
    from bossa_jax.models.encodec import EncodecEncoder, encode_fn

    cfg = load_config("tiny", ["arrange.chunk_seconds=2"])
    with pytest.raises(ConfigError, match="arrange.encodec_checkpoint"):
        Arranger(model, cfg)
    encodec = sharding.create_sharded(lambda: EncodecEncoder(cfg.encodec, rngs=nnx.Rngs(1)))
    arranger = Arranger(model, cfg, encodec=encodec)
    short = tone(tmp_path / "short.wav", 5.0)
    prepared = arranger.prepare(SongRequest("demo", leadsheet, short, bars=(8, 16)))
    samples = audio.load_clip(short, clip_frames=2**40).samples
    graphdef, state = nnx.split(encodec)
    whole = chunked_encoder(lambda x: np.asarray(encode_fn(graphdef, state, x)), 2 * 50 * 640)(
        samples
    )
    np.testing.assert_array_equal(prepared.audio.codes, whole)
    assert whole.shape == (4, 250)
    mask, codes, features = arranger._clip_inputs([prepared], 2, 1)
    start, valid = prepared.clips[2]
    assert features is None and (start, valid) == (0, 250)  # 5 s: the whole file, padded
    np.testing.assert_array_equal(codes[0, :, :250], whole)
    assert (codes[0, :, 250:] == cfg.musicgen.special_id).all()
    np.testing.assert_array_equal(mask[0], audio.clip_mask(250, 508))
    prefix = np.asarray(arranger._prefix(mask, codes, None))
    assert prefix.shape == (1, cfg.qformer.num_query_tokens, cfg.musecoco.hidden_size)
    assert np.isfinite(prefix).all()
    shifted = np.where(codes == cfg.musicgen.special_id, codes, (codes + 1) % 2048)
    assert not np.allclose(np.asarray(arranger._prefix(mask, shifted, None)), prefix)  # MusicGen
    arranger.sampler = ScriptedSampler(arranger.sampler.cfg)
    (piece,) = arranger([prepared])
    assert piece.bars == 8
