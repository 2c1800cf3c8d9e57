"""Windows, clip placement and transposition (SPEC 1.1, 6.3, 6.4, 10.12)."""

import numpy as np

from bossa_jax.audio import clip_placement
from bossa_jax.data.feature_cache import ClipRef, clip_codes
from bossa_jax.symbolic import notes, segment


def _song():
    # 4/4 at 120 qpm: bar k starts at 2k s; 12 bars; arrangement everywhere but bar 4,
    # lead sheet only in bars 0, 1 and 6..11
    arr_rows, arr_t, ls_rows, ls_t = [], [], [], []
    for bar in range(12):
        for beat in range(4):
            t = 2.0 * bar + 0.5 * beat
            if bar != 4:
                arr_rows.append([bar, 12 * beat, 0, 60, 12, 20, 9, 35])
                arr_t.append(t)
            if bar in (0, 1) or bar >= 6:
                ls_rows.append([bar, 12 * beat, 0, 72, 12, 20, 9, 35])
                ls_t.append(t)
    return notes.Song(
        "known",
        notes.NoteTable(arr_rows, arr_t),
        notes.NoteTable(ls_rows, ls_t),
        np.arange(12) * 2.0,
    )


def test_windows_bar_ranges_and_clip_centres():
    windows = segment.segment_song(_song(), n_frames=1200)
    # idx 0 -> bars 0-3; idx 2 -> bars 2-5 has no lead sheet (skipped); idx 4: no note in bar 4,
    # so b0 = 5 -> bars 5-8; idx 6 -> bars 6-9; idx 8 would need downbeat 12 (none)
    assert [w.bar_range for w in windows] == [(0, 4), (5, 9), (6, 10)]
    assert [w.downbeat_index for w in windows] == [0, 4, 6]
    assert [w.clip_centre for w in windows] == [200, 600, 800]  # (t0 + t4) * 50 // 2
    assert [(w.clip_start, w.clip_frames) for w in windows] == [(0, 508), (346, 508), (546, 508)]
    assert [len(w.arrangement) for w in windows] == [16, 16, 16]
    assert [len(w.leadsheet) for w in windows] == [8, 12, 16]


def test_clip_clamping_and_stop_rules():
    song = _song()
    # end of the file: window idx 6 needs frames up to 1054; downbeat 10 (frame 1000) is inside
    last = segment.segment_song(song, n_frames=1000)[-1]
    assert (last.clip_start, last.clip_frames) == (492, 508)
    # audio ending before downbeat idx+4 stops the listing
    assert len(segment.segment_song(song, n_frames=999)) == 2
    # official training slice: the first window wraps a negative start -> empty clip (SPEC 10.12)
    official = segment.segment_song(song, n_frames=1200, clamp=False)
    assert (official[0].clip_start, official[0].clip_frames) == (1146, 0)
    assert (official[1].clip_start, official[1].clip_frames) == (346, 508)
    # audio shorter than a clip: start 0 and its whole length
    assert segment.clip_frames(0.0, 8.0, 300) == (0, 300)
    codes, mask = clip_codes(np.zeros((4, 300), dtype=np.int64), ClipRef("s", 0, 300))
    assert (
        codes.shape == (4, 508) and (codes[:, 300:] == 2048).all() and (codes[:, :300] == 0).all()
    )
    assert mask.shape == (512,) and mask[:304].all() and not mask[304:].any()


def test_clip_length_is_honoured():
    """``audio.clip_frames`` other than 508 reaches the windows, the index and the padded codes,
    so the batches match ``stage1.batch_spec`` (it used to be 508 whatever the config said)."""
    length = 100
    windows = segment.segment_song(_song(), n_frames=1200, clip_length=length)
    # centres 200, 600, 800 (as above) -> starts centre - 50, all inside the file
    assert [(w.clip_start, w.clip_frames) for w in windows] == [(150, 100), (550, 100), (750, 100)]
    assert segment.clip_frames(0.0, 8.0, 60, length=length) == (0, 60)
    codes, mask = clip_codes(np.ones((4, 1200), np.int64), ClipRef("s", 1150, 50, length))
    assert codes.shape == (4, length) and (codes[:, 50:] == 2048).all()
    assert mask.shape == (length + 4,) and mask[:54].all() and not mask[54:].any()
    # a cache of other-length clips never matches a 508-frame index
    assert ClipRef("s", 0, 50, length).key != ClipRef("s", 0, 50).key


def test_one_clamped_placement_for_audio_codes_and_windows():
    """audio.load_clip, features.load_codes and the training windows place a clip alike."""
    for centre, total in ((10, 2000), (1990, 2000), (700, 2000), (30, 300)):
        start, valid = clip_placement(centre, total)
        assert valid == min(508, total) and 0 <= start <= max(0, total - 508)
        t = (centre + 0.5) / 50  # t_start = t_end = t gives the centre frame
        assert segment.clip_frames(t, t, total) == (start, valid)


def test_transposition_range_drums_and_copies():
    arr = notes.NoteTable([[0, 0, 0, 60, 1, 1, 9, 35], [0, 0, 128, 164, 1, 1, 9, 35]], [0.0, 0.0])
    ls = notes.NoteTable([[0, 0, 4, 48, 1, 1, 9, 35]], [0.0])
    rng = np.random.default_rng(0)
    shifts = set()
    for _ in range(400):
        a, b, shift = segment.augment(arr, ls, rng)
        shifts.add(shift)
        assert a.events[0, 3] == 60 + shift and b.events[0, 3] == 48 + shift
        assert a.events[1, 3] == 164  # drums untouched
        np.testing.assert_array_equal(a.onsets, arr.onsets)
    assert shifts == set(range(-6, 6))
    assert arr.events[0, 3] == 60 and ls.events[0, 3] == 48  # originals untouched
    window = segment.segment_song(_song(), n_frames=1200)[0]
    before = (window.clip_start, window.clip_frames)
    segment.augment(window.arrangement, window.leadsheet, rng)
    assert (window.clip_start, window.clip_frames) == before  # audio placement unchanged
