"""The ``mel`` audio front end: frozen log-mel frames in MusicGen's clip geometry, for when no
MusicGen weights exist (issue 11, item 2; config ``audio.frontend: mel``).

The Q-Former reads the frames through its unchanged cross-attention, so ``qformer.encoder_width``
must equal ``audio.n_mels``. Nothing here is trained. Geometry (SPEC 1.1, 1.2, 6.5): the clip is the
same 508-frame window as EnCodec's (:func:`bossa_jax.audio.load_clip`, or a corpus clip's
``[start, start + frames)`` frames), frames are 50 per second (hop = sample_rate / 50 = 640 samples
at 32 kHz) and there are ``clip_frames + 4`` = 512 positions with the same padding mask
(:func:`bossa_jax.audio.clip_mask`). Frame ``i`` is centred on sample ``i * hop`` of the clip
(``librosa`` ``center=True`` with zero padding), so a click at ``t`` seconds lands on frame
``50 t``; positions past the clip's samples (the 4 pattern steps, a short file's padding) see
silence.

Values: power mel spectrogram (Hann window of :data:`N_FFT` samples, Slaney mel scale), in dB,
floored at :data:`FLOOR_DB`, then ``(dB - CENTER_DB) / SCALE_DB``: silence is -1.5, a full-scale
sine about +1.4. Fixed constants, so a clip's features never depend on the rest of the batch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from bossa_jax import audio
from bossa_jax.config import Config
from bossa_jax.errors import ConfigError, DataError

N_FFT = 2048  # 64 ms at 32 kHz
FLOOR_DB = -80.0
CENTER_DB = -20.0
SCALE_DB = 40.0


def hop_length(sample_rate: int) -> int:
    """Samples per frame at MusicGen's frame rate (640 at 32 kHz)."""
    if sample_rate % audio.FRAME_RATE:
        raise DataError(f"sample rate {sample_rate} is not a multiple of {audio.FRAME_RATE} Hz")
    return sample_rate // audio.FRAME_RATE


@contextlib.contextmanager
def scipy_importable() -> Iterator[None]:
    """Lifts ``sys.modules["torch"] = None`` (how ``train.py`` keeps tensorboardX from importing
    torch) while librosa imports scipy: scipy takes any "torch" entry for the module and fails on
    None."""
    blocked = "torch" in sys.modules and sys.modules["torch"] is None
    if blocked:
        del sys.modules["torch"]
    try:
        yield
    finally:
        if blocked and "torch" not in sys.modules:
            sys.modules["torch"] = None


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate: int, n_mels: int) -> np.ndarray:
    """librosa's Slaney mel filterbank (n_mels, N_FFT // 2 + 1), float32."""
    with scipy_importable():
        import librosa

        filters = librosa.filters.mel(sr=sample_rate, n_fft=N_FFT, n_mels=n_mels)
    return filters.astype(np.float32)


def log_mel(
    samples: np.ndarray, *, sample_rate: int = audio.SAMPLE_RATE, n_mels: int, frames: int
) -> np.ndarray:
    """Mono samples -> normalised log-mel frames (frames, n_mels) float32; frame ``i`` is centred
    on sample ``i * hop`` (zeros past the end of ``samples``). The power spectrogram is
    ``librosa.feature.melspectrogram``'s (periodic Hann window, ``center=True``, zero padding),
    computed here with numpy's FFT (tests/test_mel.py checks the two agree)."""
    hop = hop_length(sample_rate)
    padded = np.zeros(frames * hop + N_FFT, np.float32)  # N_FFT // 2 zeros on each side
    samples = np.asarray(samples, np.float32)[: frames * hop]
    padded[N_FFT // 2 : N_FFT // 2 + samples.size] = samples
    windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::hop][:frames]
    hann = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    power = np.abs(np.fft.rfft(windows * hann, axis=1)) ** 2
    mels = power.astype(np.float32) @ mel_filters(sample_rate, n_mels).T
    decibels = np.maximum(10.0 * np.log10(np.maximum(mels, 1e-30)), FLOOR_DB)
    return ((decibels - CENTER_DB) / SCALE_DB).astype(np.float32)


def clip_features(
    samples: np.ndarray, valid_frames: int, cfg: Config
) -> tuple[np.ndarray, np.ndarray]:
    """A clip's samples -> (features (clip_frames + 4, n_mels), audio mask (clip_frames + 4,))."""
    clip_frames = cfg.audio.clip_frames
    features = log_mel(
        samples,
        sample_rate=cfg.encodec.sampling_rate,
        n_mels=cfg.audio.n_mels,
        frames=clip_frames + audio.PATTERN_EXTRA,
    )
    return features, audio.clip_mask(valid_frames, clip_frames)


def file_features(
    path: str | os.PathLike, cfg: Config, *, centre_frame: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The clip of an audio file (centred on the file's middle, or on ``centre_frame``, as
    :func:`bossa_jax.audio.load_clip` places it) -> (features, audio mask)."""
    clip = audio.load_clip(
        path,
        centre_frame=centre_frame,
        sample_rate=cfg.encodec.sampling_rate,
        clip_frames=cfg.audio.clip_frames,
    )
    return clip_features(clip.samples, clip.valid_frames, cfg)


def audio_frames(path: str | os.PathLike, sample_rate: int = audio.SAMPLE_RATE) -> int:
    """The file's length in 50 Hz frames (what EnCodec would give: ceil(samples / hop))."""
    samples = round(audio.audio_duration(path) * sample_rate)
    return -(-samples // hop_length(sample_rate))


def clips_fn(
    cfg: Config, audio_of: Callable[[str], str | os.PathLike]
) -> Callable[[Sequence], tuple[np.ndarray, np.ndarray]]:
    """For :func:`bossa_jax.data.feature_cache.build_clip_feature_cache`: corpus clips
    (:class:`~bossa_jax.data.feature_cache.ClipRef`) -> stacked (features, masks), each clip's
    samples read from ``audio_of(song_id)`` at its frames."""

    def compute(clips: Sequence) -> tuple[np.ndarray, np.ndarray]:
        features, masks = [], []
        for clip in clips:
            path = audio_of(clip.song_id)
            loaded = audio.load_clip(
                path,
                centre_frame=clip.start + clip.length // 2,
                sample_rate=cfg.encodec.sampling_rate,
                clip_frames=clip.length,
            )
            if loaded.start_frame != clip.start or loaded.valid_frames < clip.frames:
                raise DataError(
                    f"{path}: clip {clip.key} does not fit the audio ({loaded.valid_frames} "
                    f"frames from {loaded.start_frame}); is it the file the corpus was built from?"
                )
            samples = loaded.samples[: clip.frames * hop_length(cfg.encodec.sampling_rate)]
            f, m = clip_features(samples, clip.frames, cfg)
            features.append(f)
            masks.append(m)
        return np.stack(features), np.stack(masks)

    return compute


def compute_id(cfg: Config) -> str:
    """Names the front end and its settings in a feature cache's fingerprint."""
    return (
        f"mel:n_mels={cfg.audio.n_mels}:n_fft={N_FFT}:sr={cfg.encodec.sampling_rate}:"
        f"db={FLOOR_DB},{CENTER_DB},{SCALE_DB}"
    )


class MelExtractor:
    """The ``mel`` counterpart of :class:`bossa_jax.features.FeatureExtractor` for
    :func:`~bossa_jax.features.write_features` / :func:`~bossa_jax.features.extract_features`:
    audio files -> batches of (features (n, 512, n_mels), masks); there are no codes (the
    batches' ``codes`` are (n, 0, clip_frames))."""

    num_codebooks = 0

    def __init__(self, cfg: Config, *, batch_size: int = 8):
        if batch_size < 1:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.clip_frames = cfg.audio.clip_frames

    def check(self, paths: Sequence[str]) -> None:
        """Every input must be a decodable, non-silent audio clip (no codes: nothing to read)."""
        for path in paths:
            if Path(path).suffix.lower() == ".npy":
                raise ConfigError(
                    f"{path}: audio.frontend=mel reads audio files, not EnCodec codes"
                )
            audio.check_audio(
                path, sample_rate=self.cfg.encodec.sampling_rate, clip_frames=self.clip_frames
            )

    def iter_batches(
        self, paths: Sequence[str], *, progress: bool = True, workers: int = 2
    ) -> Iterator:
        """Checks all inputs, then yields :class:`bossa_jax.features.Batch` es in input order."""
        from bossa_jax.features import Batch

        paths = [str(p) for p in paths]
        self.check(paths)
        for start in range(0, len(paths), self.batch_size):
            group = paths[start : start + self.batch_size]
            pairs = [file_features(p, self.cfg) for p in group]
            codes = np.zeros((len(group), 0, self.clip_frames), np.int32)
            features = np.stack([f for f, _ in pairs])
            yield Batch(start, group, codes, features, np.stack([m for _, m in pairs]))
