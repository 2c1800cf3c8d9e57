"""An arrangement made audible and visible (DESIGN "Layout": render.py; issue 10 item 3).

* :func:`run_fluidsynth`: the one FluidSynth invocation of the project (offline, ``-F``; reverb and
  chorus off unless asked, so a rendering is deterministic for one FluidSynth and soundfont build).
  The style corpus's band audio (``bossa_jax.data.style_corpus``), the demo asset
  (``bossa_jax.assets.make_assets``) and :func:`render_wav` all go through it.
* :func:`render_wav`: a score or MIDI file played on a General MIDI acoustic grand piano (every
  non-drum track's program set to 0), peak-normalised to -1 dBFS, written atomically as 16-bit WAV.
* :func:`piano_roll_png`: the arrangement's notes (shade = velocity) with the lead-sheet melody
  overlaid as outlines and bar lines, drawn with matplotlib's Agg backend, written atomically.

FluidSynth and a General MIDI soundfont come from Debian (``apt-get install fluidsynth
timgm6mb-soundfont``); without them these are one-line errors that say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import symusic

from bossa_jax.errors import BossaError, one_line
from bossa_jax.outputs import atomic_output
from bossa_jax.symbolic import midi as midi_io
from bossa_jax.symbolic.notes import INSTRUMENT, MELODY_INSTRUMENT, NoteTable, Song, events_to_score

SOUNDFONT_DIR = Path("/usr/share/sounds/sf2")
# General MIDI soundfonts in the order they are preferred when none is named
SOUNDFONT_NAMES = ("TimGM6mb.sf2", "FluidR3_GM.sf2", "default-GM.sf2", "MuseScore_General.sf2")
INSTALL_HINT = "apt-get install -y --no-install-recommends fluidsynth timgm6mb-soundfont"
RENDER_RATE = 44100
PEAK_DBFS = -1.0
TAIL_SECONDS = 1.0  # kept after the last note (the piano's release)


class RenderError(BossaError):
    """FluidSynth or a soundfont is missing, or the rendering failed."""


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path:
    """The named soundfont (it must exist), else the first General MIDI one in SOUNDFONT_DIR."""
    if soundfont is not None:
        path = Path(soundfont)
        if not path.is_file():
            raise RenderError(f"{path}: soundfont not found (--soundfont); give an .sf2 file")
        return path
    for name in SOUNDFONT_NAMES:
        if (SOUNDFONT_DIR / name).is_file():
            return SOUNDFONT_DIR / name
    found = sorted(SOUNDFONT_DIR.glob("*.sf2")) if SOUNDFONT_DIR.is_dir() else []
    if found:
        return found[0]
    raise RenderError(
        f"no General MIDI soundfont in {SOUNDFONT_DIR}; install one ({INSTALL_HINT}), pass "
        "--soundfont FILE.sf2, or --no-render"
    )


def fluidsynth_binary(skip_flag: str = "--no-render") -> str:
    """The fluidsynth program; missing, an error that names the flag that does without it."""
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise RenderError(f"fluidsynth not found; install it ({INSTALL_HINT}) or pass {skip_flag}")
    return binary


def run_fluidsynth(
    midi: str | os.PathLike,
    soundfont: str | os.PathLike,
    *,
    sample_rate: int,
    effects: bool = False,
    gain: float = 0.5,
    skip_flag: str = "--no-render",
) -> np.ndarray:
    """Renders ``midi`` offline with FluidSynth; returns the stereo samples (N, 2) float32 at
    ``sample_rate``. ``effects`` keeps FluidSynth's default reverb and chorus; ``skip_flag`` is
    the command's flag named when fluidsynth is missing."""
    binary = fluidsynth_binary(skip_flag)
    with tempfile.TemporaryDirectory(prefix="bossa-render.") as tmp:
        wav = Path(tmp) / "render.wav"
        command = [binary, "-ni", "-q"]  # no MIDI input, no shell
        if not effects:
            command += ["-R", "0", "-C", "0"]
        command += ["-g", str(gain), "-r", str(sample_rate), "-O", "float", "-F", str(wav)]
        command += [str(soundfont), str(midi)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wav.is_file():
            raise RenderError(f"fluidsynth failed on {midi}: {one_line(result.stderr)}")
        samples, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise RenderError(f"fluidsynth rendered {rate} Hz instead of {sample_rate} Hz")
    return samples


def piano_score(score: symusic.Score) -> symusic.Score:
    """A copy with every non-drum track on General MIDI program 0 (acoustic grand piano)."""
    out = score.copy()
    for track in out.tracks:
        if not track.is_drum:
            track.program = 0
    return out


def render_wav(
    score_or_midi: symusic.Score | str | os.PathLike,
    out: str | os.PathLike,
    soundfont: str | os.PathLike | None = None,
    *,
    sample_rate: int = RENDER_RATE,
) -> Path:
    """Plays a score (or MIDI file) on a General MIDI piano with FluidSynth and writes ``out``
    (16-bit stereo WAV, peak -1 dBFS, cut ``TAIL_SECONDS`` after the music) atomically. A score
    without notes gives a second of silence."""
    score = (
        score_or_midi
        if isinstance(score_or_midi, symusic.Score)
        else midi_io.load_midi(score_or_midi, require_notes=False)
    )
    font = find_soundfont(soundfont)
    seconds = score.to("second").end() if score.note_num() else 0.0
    if score.note_num():
        with tempfile.TemporaryDirectory(prefix="bossa-render.") as tmp:
            midi = Path(tmp) / "piano.mid"
            piano_score(score).dump_midi(str(midi))
            samples = run_fluidsynth(midi, font, sample_rate=sample_rate)
        samples = samples[: round((seconds + TAIL_SECONDS) * sample_rate)]
        peak = float(np.max(np.abs(samples))) if samples.size else 0.0
        if peak > 0:
            samples = samples * (10 ** (PEAK_DBFS / 20) / peak)
    else:
        fluidsynth_binary()  # the same errors with or without notes
        samples = np.zeros((round(TAIL_SECONDS * sample_rate), 2), np.float32)
    final = Path(out)
    with atomic_output(final) as tmp:
        soundfile.write(str(tmp), samples, sample_rate, format="WAV", subtype="PCM_16")
    return final


def _melody_score(leadsheet: Song | NoteTable | symusic.Score | None) -> symusic.Score | None:
    """The lead sheet's melody as a score on the arrangement's bar grid."""
    if leadsheet is None:
        return None
    if isinstance(leadsheet, symusic.Score):
        out = leadsheet.copy()  # keeps tempos and time signatures
        first = next((i for i, t in enumerate(out.tracks) if len(t.notes) and not t.is_drum), 0)
        for i in reversed(range(len(out.tracks))):
            if i != first:
                out.tracks.pop(i)
        return out
    table = leadsheet.leadsheet if isinstance(leadsheet, Song) else leadsheet
    return events_to_score(table.events[table.events[:, INSTRUMENT] == MELODY_INSTRUMENT])


def _note_rectangles(score: symusic.Score) -> np.ndarray:
    """(N, 4) rows of (start quarter, length quarter, pitch, velocity) of every pitched note."""
    rows = []
    for track in score.tracks:
        if track.is_drum or not len(track.notes):
            continue
        arr = track.notes.numpy()
        rows.append(
            np.stack(
                [
                    arr["time"] / score.ticks_per_quarter,
                    arr["duration"] / score.ticks_per_quarter,
                    arr["pitch"],
                    arr["velocity"],
                ],
                axis=1,
            )
        )
    return np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 4))


def _bar_lines(score: symusic.Score, end: float) -> np.ndarray:
    """Downbeat positions in quarter notes up to ``end`` (from the score's time signatures)."""
    tpq = score.ticks_per_quarter
    changes = midi_io.time_signature_changes(score) or [(0, 4, 4)]
    lines, t, i = [], 0.0, 0
    while t <= end and len(lines) < 10_000:
        while i + 1 < len(changes) and changes[i + 1][0] / tpq <= t + 1e-9:
            i += 1
        lines.append(t)
        _, num, den = changes[i]
        t += num * 4.0 / den
    return np.array(lines)


def piano_roll_png(
    score: symusic.Score,
    leadsheet: Song | NoteTable | symusic.Score | None,
    out: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Draws the arrangement (grey-blue boxes, darker = louder) with the lead-sheet melody overlaid
    (red outlines) on one time axis in quarter notes, bar lines numbered, and writes the PNG to
    ``out`` atomically. ``leadsheet`` must be on the same bar grid as ``score`` (bar 0 = bar 0)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    notes = _note_rectangles(score)
    melody_score = _melody_score(leadsheet)
    melody = _note_rectangles(melody_score) if melody_score is not None else np.zeros((0, 4))
    both = np.concatenate([notes, melody])
    end = float((both[:, 0] + both[:, 1]).max()) if len(both) else 4.0
    low, high = (both[:, 2].min() - 2, both[:, 2].max() + 3) if len(both) else (48, 84)

    fig, ax = plt.subplots(figsize=(max(8.0, min(40.0, end / 4)), 5), dpi=100)
    try:
        if len(notes):
            shade = plt.get_cmap("Blues")(0.35 + 0.65 * np.clip(notes[:, 3], 0, 127) / 127)
            boxes = [Rectangle((s, p), d, 1) for s, d, p, _ in notes]
            ax.add_collection(PatchCollection(boxes, facecolors=shade, edgecolors="none"))
        if len(melody):
            boxes = [Rectangle((s, p), d, 1) for s, d, p, _ in melody]
            ax.add_collection(
                PatchCollection(boxes, facecolors="none", edgecolors="crimson", linewidths=1.2)
            )
        bars = _bar_lines(score if len(score.time_signatures) else melody_score or score, end)
        for number, x in enumerate(bars):
            ax.axvline(x, color="0.8", linewidth=0.6, zorder=0)
            ax.text(x + 0.1, high - 0.5, str(number), fontsize=7, color="0.5", va="top")
        ax.set_xlim(0, end)
        ax.set_ylim(low, high)
        ax.set_xlabel("quarter notes (bar lines numbered from 0)")
        ax.set_ylabel("MIDI pitch")
        ax.set_title(title or "arrangement (blue) with the lead-sheet melody (red outlines)")
        fig.tight_layout()
        final = Path(out)
        with atomic_output(final) as tmp:
            fig.savefig(str(tmp), format="png")
    finally:
        plt.close(fig)
    return final
