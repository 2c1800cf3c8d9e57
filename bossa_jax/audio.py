"""Audio input: decode, mono, resample to 32 kHz, cut the 10.16 s EnCodec window (SPEC 1.1).

The official code (SPEC 1.1) does ``torchaudio.load`` ->
``torchaudio.transforms.Resample(sr, 32000)`` (default windowed-sinc settings: Hann window,
``lowpass_filter_width=6``, ``rolloff=0.99``) -> mean over channels -> EnCodec-32 kHz. Here:

* Decoding is libsndfile through ``soundfile`` (WAV, FLAC, OGG/Vorbis, MP3 with libsndfile >= 1.1;
  soundfile 0.14's bundled libsndfile 1.2.2 reads MP3).
* Mono is the channel mean, taken **before** resampling (both are linear, so the order only changes
  float rounding, and averaging first halves the resampling work for stereo).
* Resampling is soxr at ``"HQ"`` quality, not torchaudio's sinc. The two filters differ mostly
  near Nyquist: on the demo clip (bossa_jax/assets) taken to 44.1 or 48 kHz and back to 32 kHz, soxr
  HQ and a re-implementation of torchaudio's default kernel agree to 56 dB SNR (max |diff| 2.5e-3).
  So EnCodec codes of the same file may differ in some positions from the official preprocessing;
  that is accepted (codes are a lossy quantisation; no checkpoint depends on the resampler).
  soxr's output length is ``round(n * 32000 / sr)``, torchaudio's ``ceil(...)``: the last sample
  may differ by one.
* Samples are clipped to full scale [-1, 1] (resampling can overshoot; float files can exceed 1).
  No loudness or peak normalisation is applied, as in the official code.

Windows (SPEC 1.1, inference clamp; SPEC 10.12 and 11.14): a clip is ``clip_frames`` = 508 EnCodec
frames (hop 640 samples at 32 kHz, 50 frames/s: 325120 samples, 10.16 s) starting at
``centre - 254``, clamped into the file (start < 0 -> frames [0, 508); end > T -> [T - 508, T)).
A file shorter than 508 frames is returned whole; callers pad its codes with :func:`pad_codes` and
mask them with :func:`clip_mask` (SPEC 6.5). EnCodec turns ``n`` samples into ``ceil(n / 640)``
frames (its convolutions pad the tail), which is what ``valid_frames`` counts.

Only the window is decoded: the file's length comes from the header (``soundfile.info``), then the
reader seeks to the window (plus a small margin so the resampler's edges fall outside it) and reads
just that, so a 10-minute file costs the same as a 10-second one. Inside the file the windowed
result equals resampling the whole file to within float rounding.

Every bad file raises :class:`bossa_jax.errors.AudioError` with one line naming the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

from bossa_jax.errors import AudioError, one_line

SAMPLE_RATE = 32000
FRAME_RATE = 50  # EnCodec-32 kHz frames per second (hop 640 samples at 32 kHz)
CLIP_FRAMES = 508  # AUD_LEN 10.16 s x 50 frames/s (SPEC 1.1)
PATTERN_EXTRA = 4  # delay-pattern steps added to the clip: 508 + 4 = 512 positions (SPEC 1.2)
PAD_CODE = 2048  # the special / pad id of the MusicGen codebooks (SPEC 1.2)
MIN_SECONDS = 0.5
# A window whose peak stays below -80 dBFS is treated as silent (a few 16-bit LSBs of dither
# noise are ~-84 dBFS): EnCodec would see nothing but noise floor.
SILENCE_PEAK = 1e-4
RESAMPLE_QUALITY = "HQ"
# Extra output-rate samples decoded on both sides of a window before resampling, so the resampler's
# edge transients (under ~100 samples at HQ) fall outside the kept part.
RESAMPLE_MARGIN = 1024
# A window may decode slightly short of what the header promised (MP3 frame counts are estimates);
# more than this is a truncated or corrupt file.
READ_SHORTFALL_SECONDS = 0.1

_MAGIC = (
    (b"RIFF", "WAV"),
    (b"RIFX", "WAV"),
    (b"RF64", "WAV"),
    (b"fLaC", "FLAC"),
    (b"OggS", "OGG"),
    (b"ID3", "MP3"),
    (b"FORM", "AIFF"),
)


@dataclass(frozen=True)
class AudioClip:
    """A mono clip ready for EnCodec.

    ``samples`` is float32 (n,) in [-1, 1] at ``sample_rate``; ``valid_frames`` = ceil(n / hop) is
    the number of EnCodec frames it yields (the clip length, 508, unless the file is shorter);
    ``start_seconds`` is where the clip starts in the file (a whole number of frames).
    """

    samples: np.ndarray
    sample_rate: int
    valid_frames: int
    start_seconds: float
    path: str

    @property
    def start_frame(self) -> int:
        """The clip's first EnCodec frame index in the file's 50 Hz frame grid."""
        return round(self.start_seconds * FRAME_RATE)


@dataclass(frozen=True)
class _Probe:
    path: str
    source_rate: int
    source_frames: int
    channels: int


def _sniff_container(path: Path) -> str | None:
    """The container a file's first bytes announce, for a better message when libsndfile fails."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "MP3"
    return None


def _libsndfile_message(err: Exception) -> str:
    """libsndfile's own reason, without soundfile's "Error opening '<path>': " prefix."""
    message = getattr(err, "error_string", None) or str(err)
    return one_line(message)


def _decode_error(path: Path, err: Exception) -> AudioError:
    reason = _libsndfile_message(err)
    container = _sniff_container(path)
    if container is None:
        return AudioError(
            f"{path}: not an audio file soundfile can decode (libsndfile: {reason}); "
            "give a WAV, FLAC, OGG or MP3 file"
        )
    return AudioError(
        f"{path}: corrupt or truncated {container} file (libsndfile: {reason}); "
        "re-export or re-download it"
    )


def _probe(path: str | os.PathLike) -> _Probe:
    """Reads and validates the header: exists, not empty, decodable, at least MIN_SECONDS long."""
    file = Path(path)
    if not file.exists():
        raise AudioError(f"{file}: audio file not found")
    if not file.is_file():
        raise AudioError(f"{file}: not a regular file (a directory?); give an audio file")
    if file.stat().st_size == 0:
        raise AudioError(f"{file}: audio file is empty (0 bytes)")
    try:
        info = soundfile.info(str(file))
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise _decode_error(file, err) from err
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(
            f"{file}: corrupt audio header (sample rate {info.samplerate}, "
            f"{info.channels} channels); re-export the file"
        )
    if info.frames <= 0:
        raise AudioError(f"{file}: contains no audio samples (truncated or corrupt); re-export it")
    seconds = info.frames / info.samplerate
    if seconds < MIN_SECONDS:
        raise AudioError(
            f"{file}: audio is {seconds:.2f} s long; at least {MIN_SECONDS} s is needed"
        )
    return _Probe(str(file), int(info.samplerate), int(info.frames), int(info.channels))


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header, after validating the file (see module docstring).

    Silence is only detected when samples are decoded (:func:`load_clip`), not here.
    """
    probe = _probe(path)
    return probe.source_frames / probe.source_rate


def check_audio(
    path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE, clip_frames: int = CLIP_FRAMES
) -> float:
    """The one rule every command applies to an audio input before any model work: the file
    decodes, lasts at least MIN_SECONDS, and its default clip window (the one :func:`load_clip`
    cuts) has finite samples with music in it. Returns the duration in seconds."""
    load_clip(path, sample_rate=sample_rate, clip_frames=clip_frames)
    return audio_duration(path)


def _resampled_length(source_frames: int, source_rate: int, sample_rate: int) -> int:
    """soxr's output length, round(n * sample_rate / source_rate), in exact integer arithmetic."""
    return (2 * source_frames * sample_rate + source_rate) // (2 * source_rate)


def _read_source(probe: _Probe, start: int, stop: int) -> np.ndarray:
    """Decodes source frames [start, stop) as a mono float32 array (channel mean)."""
    wanted = stop - start
    try:
        with soundfile.SoundFile(probe.path) as handle:
            if start > 0:
                handle.seek(start)
            block = handle.read(frames=wanted, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise _decode_error(Path(probe.path), err) from err
    shortfall = wanted - block.shape[0]
    if shortfall > READ_SHORTFALL_SECONDS * probe.source_rate:
        raise AudioError(
            f"{probe.path}: audio data ends early (header promises "
            f"{probe.source_frames / probe.source_rate:.2f} s, decoding stopped at "
            f"{(start + block.shape[0]) / probe.source_rate:.2f} s); "
            "the file is truncated or corrupt"
        )
    return block.mean(axis=1, dtype=np.float32)


def _read_window(probe: _Probe, start: int, stop: int, sample_rate: int) -> np.ndarray:
    """Samples [start, stop) of the file resampled to ``sample_rate``, decoding only what is needed.

    The source read starts at a multiple of ``source_rate / gcd`` so that it falls exactly on an
    output sample; soxr then keeps output sample k at time (offset + k) / sample_rate.
    """
    if probe.source_rate == sample_rate:
        return _read_source(probe, start, stop)
    step = probe.source_rate // math.gcd(probe.source_rate, sample_rate)
    margin = math.ceil(RESAMPLE_MARGIN * probe.source_rate / sample_rate)
    source_start = (start * probe.source_rate) // sample_rate - margin
    source_start = max(0, (source_start // step) * step)
    source_stop = min(probe.source_frames, -(-stop * probe.source_rate // sample_rate) + margin)
    source = _read_source(probe, source_start, source_stop)
    resampled = soxr.resample(source, probe.source_rate, sample_rate, quality=RESAMPLE_QUALITY)
    offset = source_start * sample_rate // probe.source_rate  # exact: source_start is on the grid
    return np.asarray(resampled[start - offset : stop - offset], dtype=np.float32)


def _frame_hop(sample_rate: int) -> int:
    if sample_rate <= 0 or sample_rate % FRAME_RATE:
        raise ValueError(f"sample_rate must be a positive multiple of {FRAME_RATE}: {sample_rate}")
    return sample_rate // FRAME_RATE


def load_clip(
    path: str | os.PathLike,
    centre_seconds: float | None = None,
    *,
    centre_frame: int | None = None,
    sample_rate: int = SAMPLE_RATE,
    clip_frames: int = CLIP_FRAMES,
) -> AudioClip:
    """Loads the ``clip_frames``-frame window of ``path`` centred on a time or a frame (SPEC 1.1).

    ``centre_seconds`` maps to frame floor(seconds x 50), as the official placement does
    (``round(((t_start + t_end) * 50) // 2)``); ``centre_frame`` is a 50 Hz frame index. With
    neither, the window is centred on the middle of the file. The window covers frames
    [centre - clip_frames // 2, ...) clamped into the file (SPEC 1.1 inference clamp, our default
    per SPEC 10.12); a centre past either end of the file is clamped too (SPEC 11.14: lead-sheet
    times applied to a shorter reference). A file shorter than the clip is returned whole, with
    ``valid_frames < clip_frames``.

    Raises AudioError for a missing, empty, undecodable, truncated, too short (< 0.5 s) or silent
    (peak below -80 dBFS in the window) file, or one with non-finite samples.
    """
    if centre_seconds is not None and centre_frame is not None:
        raise ValueError("give centre_seconds or centre_frame, not both")
    if clip_frames <= 0:
        raise ValueError(f"clip_frames must be positive: {clip_frames}")
    hop = _frame_hop(sample_rate)
    probe = _probe(path)

    total_samples = _resampled_length(probe.source_frames, probe.source_rate, sample_rate)
    total_frames = -(-total_samples // hop)  # EnCodec frames of the whole file
    if centre_frame is None:
        if centre_seconds is None:
            centre_frame = total_frames // 2
        else:
            if not math.isfinite(centre_seconds):
                raise ValueError(f"centre_seconds must be finite: {centre_seconds}")
            centre_frame = math.floor(centre_seconds * FRAME_RATE)
    start_frame, valid = clip_placement(int(centre_frame), total_frames, clip_frames)
    stop_frame = start_frame + valid

    start = start_frame * hop
    stop = min(stop_frame * hop, total_samples)
    samples = _read_window(probe, start, stop, sample_rate)
    if samples.size == 0:
        raise AudioError(f"{probe.path}: no audio samples could be decoded in the window")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{probe.path}: audio contains NaN or infinite samples; re-export it")
    peak = float(np.max(np.abs(samples)))
    if peak < SILENCE_PEAK:
        raise AudioError(
            f"{probe.path}: audio is silent at "
            f"{start / sample_rate:.2f}-{stop / sample_rate:.2f} s "
            f"(peak {peak:.1e}, below -80 dBFS); give a reference with music in it"
        )
    np.clip(samples, -1.0, 1.0, out=samples)
    return AudioClip(
        samples=samples,
        sample_rate=sample_rate,
        valid_frames=-(-samples.size // hop),
        start_seconds=start_frame / FRAME_RATE,
        path=probe.path,
    )


def clip_placement(
    centre_frame: int, total_frames: int, clip_frames: int = CLIP_FRAMES
) -> tuple[int, int]:
    """(first frame, valid frames) of the ``clip_frames`` window starting at
    ``centre_frame - clip_frames // 2``, clamped into a file of ``total_frames`` (SPEC 1.1
    inference clamp, our default per SPEC 10.12); a shorter file gives (0, total_frames). The one
    placement rule of audio clips, codes clips and training windows."""
    start = max(0, min(centre_frame - clip_frames // 2, total_frames - clip_frames))
    return start, min(clip_frames, total_frames - start)


def clip_mask(
    valid_frames: int, clip_frames: int = CLIP_FRAMES, pattern_extra: int = PATTERN_EXTRA
) -> np.ndarray:
    """The audio pad mask (``codec_pad_mask``, SPEC 1.2 and 6.5): float32 (clip_frames + 4,).

    1 on the first ``valid_frames + pattern_extra`` positions, 0 on the last
    ``clip_frames - valid_frames`` (the delay pattern's 4 extra steps stay valid).
    """
    if not 0 <= valid_frames <= clip_frames:
        raise ValueError(f"valid_frames must be in [0, {clip_frames}]: {valid_frames}")
    mask = np.zeros(clip_frames + pattern_extra, dtype=np.float32)
    mask[: valid_frames + pattern_extra] = 1.0
    return mask


def pad_codes(
    codes: np.ndarray, clip_frames: int = CLIP_FRAMES, pad_id: int = PAD_CODE
) -> np.ndarray:
    """Right-pads EnCodec codes (num_codebooks, T <= clip_frames) with ``pad_id`` to clip_frames."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] > clip_frames:
        raise ValueError(f"codes must be (num_codebooks, T <= {clip_frames}), got {codes.shape}")
    padded = np.full((codes.shape[0], clip_frames), pad_id, dtype=codes.dtype)
    padded[:, : codes.shape[1]] = codes
    return padded
