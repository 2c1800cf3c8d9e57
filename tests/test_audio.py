"""Tests for bossa_jax/audio.py (SPEC 1.1 windows and masks; every bad file is an AudioError)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import soxr

from bossa_jax import audio
from bossa_jax.audio import AudioClip, audio_duration, clip_mask, load_clip, pad_codes
from bossa_jax.errors import AudioError

HOP = 640
CLIP_SAMPLES = 508 * HOP  # 325120 samples = 10.16 s at 32 kHz


def _tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * rate / samples.size)


def _write(path, data, rate, subtype=None):
    soundfile.write(str(path), data, rate, subtype=subtype)
    return path


# ---------------------------------------------------------------- bad files


def _assert_audio_error(path, *needles):
    with pytest.raises(AudioError) as info:
        load_clip(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for needle in needles:
        assert needle in message
    return message


def test_missing_file(tmp_path):
    _assert_audio_error(tmp_path / "nope.wav", "not found")
    with pytest.raises(AudioError, match="not found"):
        audio_duration(tmp_path / "nope.wav")


def test_directory(tmp_path):
    _assert_audio_error(tmp_path, "not a regular file")


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _assert_audio_error(path, "empty (0 bytes)")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a shopping list, not audio\n" * 20)
    _assert_audio_error(path, "not an audio file", "Format not recognised")


def test_truncated_wav_header(tmp_path):
    good = _write(tmp_path / "good.wav", _tone(2.0, 32000), 32000)
    path = tmp_path / "truncated.wav"
    path.write_bytes(good.read_bytes()[:30])
    _assert_audio_error(path, "corrupt or truncated WAV")


def test_garbled_wav_header(tmp_path):
    raw = bytearray(_write(tmp_path / "good.wav", _tone(2.0, 32000), 32000).read_bytes())
    raw[8:16] = b"XXXXXXXX"  # "WAVEfmt " -> junk
    path = tmp_path / "garbled.wav"
    path.write_bytes(bytes(raw))
    _assert_audio_error(path, "corrupt or truncated WAV")


@pytest.mark.parametrize("extension", ["flac", "ogg", "mp3"])
def test_truncated_compressed_file(tmp_path, extension):
    good = _write(tmp_path / f"good.{extension}", _tone(4.0, 32000), 32000)
    path = tmp_path / f"half.{extension}"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _assert_audio_error(path)
    assert "truncated" in message or "corrupt" in message


def test_silence(tmp_path):
    path = _write(tmp_path / "silence.wav", np.zeros(32000 * 3, np.float32), 32000)
    _assert_audio_error(path, "silent")


def test_too_short(tmp_path):
    path = _write(tmp_path / "blip.wav", _tone(0.3, 32000), 32000)
    _assert_audio_error(path, "0.30 s long", "0.5 s")
    with pytest.raises(AudioError, match="0.5 s"):
        audio_duration(path)


def test_non_finite_samples(tmp_path):
    data = _tone(2.0, 32000)
    data[1000] = np.nan
    path = _write(tmp_path / "nan.wav", data, 32000, subtype="FLOAT")
    _assert_audio_error(path, "NaN")


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("extension", "tolerance"), [("wav", 0.0), ("flac", 1e-4), ("ogg", None), ("mp3", None)]
)
def test_formats_decode(tmp_path, extension, tolerance):
    data = _tone(3.0, 32000, freq=1000.0)
    subtype = "FLOAT" if extension == "wav" else None
    path = _write(tmp_path / f"tone.{extension}", data, 32000, subtype=subtype)
    assert audio_duration(path) == pytest.approx(3.0, abs=0.06)
    clip = load_clip(path)
    assert isinstance(clip, AudioClip)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert clip.sample_rate == 32000 and clip.start_seconds == 0.0
    assert clip.valid_frames == math.ceil(clip.samples.size / HOP)
    if tolerance is not None:
        np.testing.assert_allclose(clip.samples, data, atol=tolerance, rtol=0)
    else:  # lossy: length and pitch survive
        assert abs(clip.samples.size - data.size) < 0.06 * 32000
        assert _peak_frequency(clip.samples, 32000) == pytest.approx(1000.0, abs=2.0)


def test_stereo_is_channel_mean(tmp_path):
    left, right = _tone(2.0, 32000, 300.0, 0.6), _tone(2.0, 32000, 500.0, 0.2)
    path = _write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 32000, "FLOAT")
    clip = load_clip(path)
    np.testing.assert_allclose(clip.samples, (left + right) / 2, atol=1e-7, rtol=0)


def test_clipped_to_full_scale(tmp_path):
    path = _write(tmp_path / "hot.wav", _tone(2.0, 32000, amp=1.5), 32000, "FLOAT")
    samples = load_clip(path).samples
    assert samples.max() == 1.0 and samples.min() == -1.0


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampled_length_and_pitch(tmp_path, rate):
    data = _tone(3.0, rate, freq=1000.0) + _tone(3.0, rate, freq=3000.0, amp=0.2)
    path = _write(tmp_path / f"tone{rate}.wav", data, rate, "FLOAT")
    clip = load_clip(path)
    assert clip.samples.size == round(data.size * 32000 / rate) == 96000
    assert clip.valid_frames == 150
    assert _peak_frequency(clip.samples, 32000) == pytest.approx(1000.0, abs=1.0)
    # The whole-file reference resample of the independent soxr call.
    reference = soxr.resample(data, rate, 32000, quality="HQ")
    np.testing.assert_allclose(clip.samples, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [44100, 48000])
def test_window_equals_whole_file_resample(tmp_path, rate):
    rng = np.random.default_rng(0)
    data = (0.3 * rng.standard_normal(30 * rate)).astype(np.float32)
    path = _write(tmp_path / f"noise{rate}.wav", data, rate, "FLOAT")
    whole = np.clip(soxr.resample(data, rate, 32000, quality="HQ"), -1, 1)
    for centre in (6.37, 15.0, 20.01):
        clip = load_clip(path, centre)
        start = clip.start_frame * HOP
        assert clip.start_frame == math.floor(centre * 50) - 254
        assert clip.samples.size == CLIP_SAMPLES and clip.valid_frames == 508
        np.testing.assert_allclose(clip.samples, whole[start : start + CLIP_SAMPLES], atol=2e-6)


# ---------------------------------------------------------------- windows


@pytest.fixture(scope="module")
def noise_32k(tmp_path_factory):
    """25.3 s of noise at 32 kHz (no resampling: windows are exact slices)."""
    rng = np.random.default_rng(1)
    data = np.clip(0.2 * rng.standard_normal(round(25.3 * 32000)), -1, 1).astype(np.float32)
    path = tmp_path_factory.mktemp("win") / "noise.wav"
    _write(path, data, 32000, "FLOAT")
    return path, data


def test_window_centred(noise_32k):
    path, data = noise_32k
    clip = load_clip(path, 12.0)
    assert clip.start_frame == 600 - 254 and clip.start_seconds == pytest.approx(346 / 50)
    np.testing.assert_array_equal(clip.samples, data[346 * HOP : 346 * HOP + CLIP_SAMPLES])
    by_frame = load_clip(path, centre_frame=600)
    np.testing.assert_array_equal(by_frame.samples, clip.samples)
    # Official placement: floor(centre x 50), so 12.019 s is still frame 600.
    assert load_clip(path, 12.019).start_frame == 346


def test_window_default_is_middle(noise_32k):
    path, data = noise_32k
    total_frames = math.ceil(data.size / HOP)  # 1265
    clip = load_clip(path)
    assert clip.start_frame == total_frames // 2 - 254


def test_window_clamped_at_start(noise_32k):
    path, data = noise_32k
    for centre in (0.0, 2.0, -5.0):
        clip = load_clip(path, centre)
        assert clip.start_frame == 0 and clip.valid_frames == 508
        np.testing.assert_array_equal(clip.samples, data[:CLIP_SAMPLES])


def test_window_clamped_at_end(noise_32k):
    path, data = noise_32k
    total_frames = math.ceil(data.size / HOP)
    for centre in (24.0, 25.3, 400.0):
        clip = load_clip(path, centre)
        assert clip.start_frame == total_frames - 508
        assert clip.valid_frames == 508
        # The last frame is partial: the clip ends with the file, EnCodec pads that frame.
        np.testing.assert_array_equal(clip.samples, data[(total_frames - 508) * HOP :])


def test_short_file_whole_with_mask_and_padding(tmp_path):
    data = _tone(3.3, 32000)
    path = _write(tmp_path / "short.wav", data, 32000, "FLOAT")
    for centre in (None, 0.0, 1.6, 99.0):
        clip = load_clip(path, centre)
        assert clip.start_frame == 0 and clip.samples.size == data.size
        assert clip.valid_frames == math.ceil(3.3 * 32000 / HOP) == 165
    mask = clip_mask(clip.valid_frames)
    assert mask.shape == (512,) and mask.dtype == np.float32
    assert mask[: 165 + 4].min() == 1.0 and mask[165 + 4 :].max() == 0.0
    assert mask.sum() == 169
    codes = np.arange(4 * 165, dtype=np.int64).reshape(4, 165) % 2048
    padded = pad_codes(codes)
    assert padded.shape == (4, 508) and padded.dtype == np.int64
    np.testing.assert_array_equal(padded[:, :165], codes)
    assert (padded[:, 165:] == 2048).all()


def test_mask_and_pad_edges():
    np.testing.assert_array_equal(clip_mask(508), np.ones(512, np.float32))
    np.testing.assert_array_equal(clip_mask(0), np.r_[np.ones(4), np.zeros(508)].astype(np.float32))
    assert (pad_codes(np.zeros((4, 0), np.int32)) == 2048).all()
    full = np.ones((4, 508), np.int32)
    np.testing.assert_array_equal(pad_codes(full), full)
    with pytest.raises(ValueError):
        clip_mask(509)
    with pytest.raises(ValueError):
        clip_mask(-1)
    with pytest.raises(ValueError):
        pad_codes(np.zeros((4, 509), np.int32))
    with pytest.raises(ValueError):
        pad_codes(np.zeros(10, np.int32))


def test_both_centres_rejected(noise_32k):
    with pytest.raises(ValueError):
        load_clip(noise_32k[0], 3.0, centre_frame=150)


def test_long_file_reads_only_the_window(tmp_path, monkeypatch):
    rate = 8000
    minutes = 10
    t = np.arange(minutes * 60 * rate, dtype=np.float32) / rate
    path = _write(
        tmp_path / "long.wav", (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate
    )
    assert audio_duration(path) == pytest.approx(600.0)

    requested: list[int] = []
    original_read = soundfile.SoundFile.read

    def spy_read(self, frames=-1, *args, **kwargs):
        requested.append(frames)
        return original_read(self, frames, *args, **kwargs)

    def whole_file_read(*args, **kwargs):
        raise AssertionError("soundfile.read would decode the whole file")

    monkeypatch.setattr(soundfile.SoundFile, "read", spy_read)
    monkeypatch.setattr(soundfile, "read", whole_file_read)
    clip = load_clip(path, 300.0)
    assert clip.valid_frames == 508 and clip.start_frame == 15000 - 254
    window_source = CLIP_SAMPLES * rate // 32000  # 81280 source samples
    margin = 2 * math.ceil(audio.RESAMPLE_MARGIN * rate / 32000) + 2
    assert len(requested) == 1 and 0 < requested[0] <= window_source + margin
    assert _peak_frequency(clip.samples, 32000) == pytest.approx(220.0, abs=0.5)


# ---------------------------------------------------------------- EnCodec framing


def test_valid_frames_match_encodec_framing(tmp_path):
    """HF EnCodec with the encodec_32khz ratios yields ceil(n / 640) frames of 4 codebooks."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.EncodecConfig(
        sampling_rate=32000,
        audio_channels=1,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        codebook_size=2048,
        codebook_dim=8,
        hidden_size=8,
        num_filters=2,
        num_residual_layers=1,
        num_lstm_layers=1,
        normalize=False,
        chunk_length_s=None,
    )
    assert config.hop_length == HOP and config.frame_rate == 50
    torch.manual_seed(0)
    model = transformers.EncodecModel(config).eval()

    short = _write(tmp_path / "short.wav", _tone(2.71, 44100), 44100, "FLOAT")
    clips = [load_clip(short).samples]
    clips += [np.zeros(n, np.float32) + 0.1 for n in (16000, 16001, 31999, CLIP_SAMPLES - 1)]
    for samples in clips:
        with torch.no_grad():
            encoded = model.encode(torch.from_numpy(samples)[None, None], bandwidth=2.2)
        codes = encoded.audio_codes
        assert codes.shape[-2] == 4
        assert codes.shape[-1] == math.ceil(samples.size / HOP)
    assert load_clip(short).valid_frames == math.ceil(round(2.71 * 32000) / HOP)
