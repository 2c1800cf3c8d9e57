"""PIAST audio/MIDI onset alignment (SPEC 1.1, 6.1; official write_PIAST_to_hdf5.py).

PIAST's audio (YouTube piano covers) and its transcribed MIDI start at different times. Before
encoding, the official preprocessing shifts the waveform so that the first onset librosa detects in
the audio falls on the first note onset of MIDI track 0 (the piano performance)::

    shift = first_audio_onset - first_note      (seconds)
    shift < 0: prepend int(-shift * sr) zeros   (the audio starts too early)
    shift > 0: drop the first int(shift * sr)   (the audio starts late)

Onset detection runs exactly as there: ``librosa.onset.onset_detect`` with its defaults (onset
strength of a mel spectrogram, hop 512, no backtracking) on the mono waveform already resampled to
32 kHz (``sr=32000``), ``units="time"``, earliest onset. Sample counts are truncated towards zero
(``int``), as the official code does. With hop 512 at 32 kHz the detected onset is quantised to
16 ms frames, so the alignment is good to about one frame. The official 32 kHz waveform comes from
torchaudio's ``Resample``, ours from soxr (``bossa_jax.audio.load_clip``, clipped to [-1, 1]), so on
resampled audio the detected onset may differ slightly.
"""

from __future__ import annotations

import numpy as np

from bossa_jax.errors import AudioError


def first_audio_onset(waveform: np.ndarray, sample_rate: int) -> float | None:
    """The earliest onset (seconds) librosa detects in a mono waveform, or None if it finds none."""
    import librosa  # imported here: it pulls numba, which only this step needs

    onsets = librosa.onset.onset_detect(
        y=np.asarray(waveform, np.float32), sr=sample_rate, units="time"
    )
    return float(np.min(onsets)) if len(onsets) else None


def shift_waveform(waveform: np.ndarray, sample_rate: int, shift_seconds: float) -> np.ndarray:
    """Moves the audio ``shift_seconds`` earlier: trims the start (shift > 0) or zero-pads the
    front (shift < 0), by ``int(shift * sample_rate)`` samples (SPEC 1.1)."""
    samples = int(shift_seconds * sample_rate)
    if samples > 0:
        return waveform[samples:]
    if samples < 0:
        return np.concatenate([np.zeros(-samples, waveform.dtype), waveform])
    return waveform


def align_to_midi(
    waveform: np.ndarray, sample_rate: int, first_note_seconds: float
) -> tuple[np.ndarray, float]:
    """(the waveform shifted so its first onset meets the MIDI's first note, the shift in seconds:
    positive when the audio started late). Raises AudioError when no onset is found or the shift
    leaves no audio."""
    onset = first_audio_onset(waveform, sample_rate)
    if onset is None:
        raise AudioError("no onset detected in the audio; cannot align it to the MIDI")
    shift = onset - first_note_seconds
    aligned = shift_waveform(waveform, sample_rate, shift)
    if aligned.size == 0:
        raise AudioError(
            f"aligning to the MIDI drops all the audio (first onset {onset:.2f} s, first note "
            f"{first_note_seconds:.2f} s); check that the audio and MIDI are the same song"
        )
    return aligned, shift
