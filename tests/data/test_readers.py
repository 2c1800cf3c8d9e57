"""Dataset readers: POP909 tree, PIAST files, JSONL manifests, skipping and splits."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import symusic

from bossa_jax.data import readers, synthetic
from bossa_jax.errors import DataError
from bossa_jax.symbolic.midi import write_midi
from bossa_jax.symbolic.notes import CHORD_INSTRUMENT, INSTRUMENT, MELODY_INSTRUMENT


@pytest.fixture(scope="module")
def pop909(tmp_path_factory):
    """3 good songs; 004 corrupt MIDI; 005 no audio; 006 corrupt audio; 007 no chord file."""
    root = tmp_path_factory.mktemp("pop")
    pop, audio = root / "POP909", root / "audio"
    for i, name in enumerate(("001", "002", "003", "004", "005", "006", "007")):
        synthetic.write_pop909_song(pop, name, bars=8, seed=i, audio_root=audio)
    (pop / "004" / "004.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    (audio / "005.wav").unlink()
    (audio / "006.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    (pop / "007" / "chord_midi.txt").unlink()
    # the official accompaniment layout is found too
    (audio / "002").mkdir()
    shutil.move(audio / "002.wav", audio / "002" / "accompaniment.wav")
    return root


def test_pop909_tree_reads_good_songs_and_skips_bad_ones(pop909, caplog):
    sources = readers.pop909_sources(pop909 / "POP909", pop909 / "audio")
    assert [s.id for s in sources][:3] == ["pop909/001", "pop909/002", "pop909/003"]
    assert sources[1].audio == pop909 / "audio" / "002" / "accompaniment.wav"
    with caplog.at_level(logging.WARNING):
        records, summary = readers.read_songs(sources)
    assert [r.id for r in records] == ["pop909/001", "pop909/002", "pop909/003"]
    assert (summary.listed, summary.read, summary.num_skipped) == (7, 3, 4)
    reasons = dict(summary.skipped)
    assert "corrupt" in reasons["pop909/004"] and "004.mid" in reasons["pop909/004"]
    assert "no audio" in reasons["pop909/005"]
    assert "006.wav" in reasons["pop909/006"]
    assert "chord_midi.txt" in reasons["pop909/007"]
    assert sum("skipped pop909/" in r.message for r in caplog.records) == 4
    assert all("\n" not in reason for _, reason in summary.skipped)

    song = records[0].song
    # 8 bars at 120 bpm: downbeats every 2 s; arrangement = every track of the MIDI
    np.testing.assert_allclose(song.downbeat_times[:8], np.arange(8) * 2.0)
    midi = symusic.Score.from_file(str(pop909 / "POP909" / "001" / "001.mid"))
    assert len(song.arrangement) == sum(len(t.notes) for t in midi.tracks)
    inst = song.leadsheet.events[:, INSTRUMENT]
    assert np.count_nonzero(inst == MELODY_INSTRUMENT) == 8 * 4
    assert np.count_nonzero(inst == CHORD_INSTRUMENT) > 0  # chords spelled as notes


def test_missing_tree_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        readers.pop909_sources(tmp_path / "nope")


def test_piast_layout(tmp_path):
    q = 480
    score = symusic.Score(q)
    score.tempos.append(symusic.Tempo(time=0, qpm=100.0))
    piano = symusic.Track(name="piano", program=0)
    melody = symusic.Track(name="melody", program=0)
    for bar in range(6):
        for beat in range(4):
            piano.notes.append(symusic.Note((bar * 4 + beat) * q, q, 48 + beat, 70))
        melody.notes.append(symusic.Note(bar * 4 * q, 2 * q, 72, 90))
        score.markers.append(
            symusic.TextMeta(time=bar * 4 * q, text="C_M_C" if bar % 2 else "A_m_A")
        )
    score.tracks.extend([piano, melody])
    write_midi(score, tmp_path / "midi" / "sub" / "songA.mid")
    (tmp_path / "midi" / "songB.mid").write_text("not midi")
    (tmp_path / "audio").mkdir()
    for stem in ("songA", "songB"):
        soundfile.write(str(tmp_path / "audio" / f"{stem}.flac"), 0.1 * np.ones(8000), 8000)
    sources = readers.piast_sources(tmp_path / "midi", tmp_path / "audio")
    assert [s.name for s in sources] == ["songB", "songA"]  # sorted by path
    records, summary = readers.read_songs(sources)
    assert [r.id for r in records] == ["piast/songA"] and summary.num_skipped == 1
    song = records[0].song
    assert len(song.arrangement) == 24
    assert set(song.leadsheet.events[:, INSTRUMENT].tolist()) == {0, 4}


def _write_leadsheet(path: Path, qpm: float) -> None:
    q = 480
    score = symusic.Score(q)
    score.tempos.append(symusic.Tempo(time=0, qpm=qpm))
    score.time_signatures.append(symusic.TimeSignature(time=0, numerator=4, denominator=4))
    melody, chords = symusic.Track(name="melody"), symusic.Track(name="chords")
    for bar in range(8):
        melody.notes.append(symusic.Note(bar * 4 * q, 4 * q, 67, 90))
        for pitch in (48, 52, 55):
            chords.notes.append(symusic.Note(bar * 4 * q, 4 * q, pitch, 80))
    score.tracks.extend([melody, chords])
    write_midi(score, path)


def test_jsonl_manifest(pop909, tmp_path):
    song_dir = pop909 / "POP909" / "001"
    _write_leadsheet(tmp_path / "lead.mid", 120.0)
    _write_leadsheet(tmp_path / "lead_fast.mid", 150.0)
    audio = pop909 / "audio" / "001.wav"
    lines = [
        {"arrangement": str(song_dir / "001.mid"), "audio": str(audio), "leadsheet": "lead.mid",
         "id": "with_leadsheet", "split": "test"},
        {"arrangement": str(song_dir / "001.mid"), "audio": str(audio),
         "chords": str(song_dir / "chord_midi.txt"), "id": "with_chords"},
        "{not json",
        {"audio": str(audio), "leadsheet": "lead.mid"},
        {"arrangement": "missing.mid", "audio": str(audio), "leadsheet": "lead.mid"},
        {"arrangement": str(song_dir / "001.mid"), "audio": str(audio),
         "leadsheet": "lead_fast.mid", "id": "other_timeline"},
        {"arrangement": str(song_dir / "001.mid"), "audio": str(audio), "chords": "c.txt",
         "id": "with_chords"},
    ]  # fmt: skip
    manifest = tmp_path / "mine.jsonl"
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    sources, listing = readers.manifest_sources(manifest)
    assert listing.listed == 7 and listing.num_skipped == 3  # bad JSON, no arrangement, dup id
    assert [s.id for s in sources] == [
        "mine/with_leadsheet", "mine/with_chords", "mine/missing", "mine/other_timeline"
    ]  # fmt: skip
    records, summary = readers.read_songs(sources)
    assert [r.id for r in records] == ["mine/with_leadsheet", "mine/with_chords"]
    assert records[0].split == "test"
    reasons = dict(summary.skipped)
    assert "missing.mid" in reasons["mine/missing"]
    assert "do not line up" in reasons["mine/other_timeline"]
    lead = records[0].song.leadsheet
    assert Counter(lead.events[:, INSTRUMENT].tolist()) == {0: 8, 4: 24}
    # chords-file variant: melody from the MELODY track, same as the POP909 reader's lead sheet
    pop_song = readers.read_song(readers.pop909_sources(pop909 / "POP909")[0])
    np.testing.assert_array_equal(records[1].song.leadsheet.events, pop_song.leadsheet.events)
    np.testing.assert_array_equal(records[1].song.arrangement.events, pop_song.arrangement.events)


def test_hash_split_is_deterministic_stable_and_90_5_5():
    ids = [f"ds/{i:05d}" for i in range(4000)]
    splits = [readers.hash_split(i) for i in ids]
    assert splits == [readers.hash_split(i) for i in ids]
    counts = Counter(splits)
    assert abs(counts["train"] / 4000 - 0.90) < 0.02
    assert abs(counts["validation"] / 4000 - 0.05) < 0.015
    assert abs(counts["test"] / 4000 - 0.05) < 0.015
    # adding songs never moves the existing ones
    more = ids + [f"ds/new{i}" for i in range(500)]
    assert [readers.hash_split(i) for i in more][:4000] == splits


def test_split_file_and_split_selection(pop909, tmp_path):
    split_file = tmp_path / "dataset_split.json"
    split_file.write_text(json.dumps({"POP909": {"validation": ["001"], "test": ["003"]}}))
    sources = readers.pop909_sources(pop909 / "POP909", pop909 / "audio")
    records, summary = readers.read_songs(sources, split="train", split_file=split_file)
    assert [r.id for r in records] == ["pop909/002"]
    assert summary.listed == 5  # songs 002 and 004-007 are train; the bad ones are still counted
    records, _ = readers.read_songs(sources, split=["validation", "test"], split_file=split_file)
    assert [(r.id, r.split) for r in records] == [
        ("pop909/001", "validation"),
        ("pop909/003", "test"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="bad.json"):
        readers.read_songs(sources, split_file=bad)
    with pytest.raises(DataError, match="unknown split"):
        readers.read_songs(sources, split="dev")


@pytest.mark.parametrize("bug", [TypeError, KeyError])
def test_a_bug_is_not_a_skipped_song(pop909, monkeypatch, bug):
    """Only what a bad song raises is skipped and counted; a bug in the reading code propagates
    (issue 8 item 4d). The corrupt MIDI (004) is still skipped."""
    sources = readers.pop909_sources(pop909 / "POP909", pop909 / "audio")
    real = readers.ls_io.read_pop909

    def read_pop909(folder, **kwargs):
        if folder.name == "003":
            raise bug("a bug in the reader")
        return real(folder, **kwargs)

    monkeypatch.setattr(readers.ls_io, "read_pop909", read_pop909)
    with pytest.raises(bug, match="a bug in the reader"):
        readers.read_songs(sources)
    _, summary = readers.read_songs([s for s in sources if s.name != "003"])
    assert (summary.read, summary.num_skipped) == (2, 4)  # the bad songs are still skipped
    assert "corrupt" in dict(summary.skipped)["pop909/004"]
