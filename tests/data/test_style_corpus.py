"""The synthetic style corpus (bossa_jax/data/style_corpus.py): valid files that the project's own
readers take, a deterministic generator, every key and style reachable, the styles' registers and
chord tones, and the train.py make-corpus command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import symusic

from bossa_jax import audio
from bossa_jax.data import readers
from bossa_jax.data import style_corpus as sc
from bossa_jax.errors import ConfigError
from bossa_jax.symbolic.leadsheet import read_leadsheet
from bossa_jax.symbolic.notes import CHORD_INSTRUMENT, INSTRUMENT, MELODY_INSTRUMENT, PITCH

ROOT = Path(__file__).resolve().parents[2]
BARS = 4
needs_fluidsynth = pytest.mark.skipif(
    not sc.DEFAULT_SOUNDFONT.is_file(), reason="FluidSynth soundfont not installed"
)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One song of each style, with audio."""
    out = tmp_path_factory.mktemp("style") / "corpus"
    sc.make_corpus(out, songs=len(sc.STYLES), bars=BARS, seed=5)
    return out


def test_manifest_is_read_by_the_jsonl_reader_with_the_held_out_split(corpus):
    sources, summary = readers.manifest_sources(corpus / "manifest.jsonl")
    assert summary.num_skipped == 0 and len(sources) == len(sc.STYLES)
    records, summary = readers.read_songs(sources, require_audio=True)
    assert summary.read == len(sc.STYLES) and not summary.skipped
    entries = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["style"] for e in entries) == sorted(sc.STYLES)
    split = json.loads((corpus / "split.json").read_text())[sc.DATASET]
    assert len(split["test"]) == 1 and len(split["validation"]) == 1
    assert not set(split["test"]) & set(split["validation"])
    by_manifest = {r.song.name: r.split for r in records}
    # the split file alone (manifest split fields ignored) gives the same held-out songs
    plain = [readers.SongSource(**{**s.__dict__, "split": None}) for s in sources]
    from_file, _ = readers.read_songs(
        plain, split=["validation", "test"], split_file=corpus / "split.json", require_audio=False
    )
    assert {r.song.name: r.split for r in from_file} == {
        k: v for k, v in by_manifest.items() if v != "train"
    }
    assert sorted(r.song.name for r in from_file) == sorted(split["test"] + split["validation"])


def test_midi_files_read_back(corpus):
    for entry in map(json.loads, (corpus / "manifest.jsonl").read_text().splitlines()):
        beats = sc.BEATS_PER_BAR.get(entry["style"], 4)
        arrangement = symusic.Score(str(corpus / entry["arrangement"]))
        assert [t.name for t in arrangement.tracks] == ["Right hand", "Left hand"]
        assert arrangement.time_signatures[0].numerator == beats
        assert all(t.program == 0 and len(t.notes) for t in arrangement.tracks)
        band = symusic.Score(str(corpus / "band" / f"{entry['id']}.mid"))
        pitched = [t for t in band.tracks if not t.is_drum]
        assert len(pitched) >= 3 and all(t.program not in range(0, 4) for t in pitched)  # no piano
        lead = read_leadsheet(corpus / entry["leadsheet"]).leadsheet.events
        assert np.any(lead[:, INSTRUMENT] == MELODY_INSTRUMENT)
        chords = lead[lead[:, INSTRUMENT] == CHORD_INSTRUMENT]
        assert chords[:, PITCH].min() >= 48 and chords[:, PITCH].max() < 48 + 12 + 12  # SPEC 6.2


def test_audio_decodes_and_lasts_the_song(corpus):
    corpus_info = json.loads((corpus / "corpus.json").read_text())["songs"]
    for song_id, info in corpus_info.items():
        path = corpus / "audio" / f"{song_id}.flac"
        beats = sc.BEATS_PER_BAR.get(info["style"], 4)
        seconds = info["bars"] * beats * 60 / info["tempo"]
        assert audio.audio_duration(path) == pytest.approx(seconds + sc.TAIL_SECONDS, abs=0.01)
        clip = audio.load_clip(path)  # decodes, mono 32 kHz, not silent
        assert clip.sample_rate == 32000 and np.abs(clip.samples).max() > 0.5


@needs_fluidsynth
def test_same_seed_same_bytes_other_seed_other_songs(tmp_path):
    kwargs = {"songs": 2, "bars": 2, "styles": ("bossa", "pop")}
    a, b, c = (tmp_path / n for n in "abc")
    sc.make_corpus(a, seed=1, **kwargs)
    sc.make_corpus(b, seed=1, **kwargs)
    sc.make_corpus(c, seed=2, audio=False, **kwargs)
    assert files(a) == files(b)  # MIDI, manifest and the FluidSynth audio
    midi = {k: v for k, v in files(a).items() if k.endswith(".mid")}
    assert midi != {k: v for k, v in files(c).items() if k.endswith(".mid")}


def test_every_key_and_style_reachable_and_the_registers_hold():
    specs = sc.song_specs(24, seed=0)
    assert {s.key for s in specs} == set(range(12))
    assert {s.style for s in specs} == set(sc.STYLES)
    assert {s.key for s in specs[:12]} == set(range(12))  # every block of 12 songs: all keys
    for spec in specs:
        low, high = sc.TEMPO_RANGE[spec.style]
        assert low <= spec.tempo <= high
        melody = sc.make_melody(spec, np.random.default_rng(0))
        assert sc.MELODY_LOW <= min(melody.pitches) and max(melody.pitches) <= sc.MELODY_HIGH
        parts = sc.accompaniment(spec)
        chords = sc.chords_of(spec)
        for part in parts.values():
            if part.pitches:
                assert max(part.pitches) <= sc.ACCOMPANIMENT_HIGH
            for onset, pitch in zip(part.onsets, part.pitches):  # accompaniment = chord tones
                root, intervals = chords[int(onset // spec.beats_per_bar)]
                assert (pitch - root) % 12 in intervals
        for onset, pitch in zip(melody.onsets, melody.pitches):  # chord tones on the beats
            if onset == int(onset):
                root, intervals = chords[int(onset // spec.beats_per_bar)]
                assert (pitch - root) % 12 in intervals


def test_bad_styles_and_counts_are_config_errors():
    with pytest.raises(ConfigError, match="--styles"):
        sc.song_specs(3, styles=("polka",))
    with pytest.raises(ConfigError, match="--songs"):
        sc.song_specs(0)


def test_make_corpus_command_refuses_to_overwrite_without_the_flag(tmp_path):
    out = tmp_path / "corpus"
    command = [sys.executable, "train.py", "make-corpus", "--out", str(out), "--songs", "2",
               "--bars", "1", "--no-audio"]  # fmt: skip
    run = lambda *extra: subprocess.run(  # noqa: E731
        [*command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    first = run()
    assert first.returncode == 0, first.stderr
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    assert not (out / "audio").exists()
    again = run()
    assert again.returncode != 0 and again.stderr.startswith("error:")
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert run("--overwrite").returncode == 0
