"""The frozen log-mel front end (bossa_jax/mel.py, ``audio.frontend: mel``): clip geometry and
frame rate, determinism, the config rule, ``python -m bossa_jax.features`` with a mel config, and
the stage-1 features path (window index from the audio, feature cache of mel frames)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bossa_jax import audio, features, mel
from bossa_jax.config import load_config
from bossa_jax.data import style_corpus as sc
from bossa_jax.errors import ConfigError
from tests.mel_config import mel_overrides

ROOT = Path(__file__).resolve().parents[1]
N_MELS = 16
MEL = mel_overrides(N_MELS)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", MEL)


def clicks(path, times, seconds, rate=audio.SAMPLE_RATE):
    y = np.zeros(round(seconds * rate), np.float32)
    y += 1e-3 * np.random.default_rng(0).standard_normal(y.size).astype(np.float32)
    for t in times:
        y[round(t * rate)] = 0.9
    soundfile.write(str(path), y, rate, subtype="FLOAT")
    return path


def test_shape_mask_and_click_frames(cfg, tmp_path):
    times = (0.5, 1.23, 2.71, 3.333)
    feats, mask = mel.file_features(clicks(tmp_path / "c.wav", times, 4.0), cfg)
    assert feats.shape == (512, N_MELS) and feats.dtype == np.float32
    np.testing.assert_array_equal(mask, audio.clip_mask(200, 508))  # 4 s = 200 frames
    energy = feats.mean(axis=1)
    for t in times:  # a click at t seconds peaks at frame 50 t (within one frame)
        near = slice(round(50 * t) - 5, round(50 * t) + 6)
        assert abs(near.start + int(np.argmax(energy[near])) - 50 * t) <= 1
    assert np.allclose(feats[204:], (mel.FLOOR_DB - mel.CENTER_DB) / mel.SCALE_DB)  # padding


def test_matches_librosa_melspectrogram():
    """The numpy STFT + librosa filterbank equals librosa.feature.melspectrogram (center=True,
    zero padding) before the dB normalisation."""
    y = 0.3 * np.random.default_rng(1).standard_normal(512 * 640).astype(np.float32)
    with mel.scipy_importable():
        import librosa

        power = librosa.feature.melspectrogram(
            y=y, sr=32000, n_fft=mel.N_FFT, hop_length=640, n_mels=N_MELS, pad_mode="constant"
        )[:, :512]
    decibels = np.maximum(10 * np.log10(np.maximum(power, 1e-30)), mel.FLOOR_DB)
    want = ((decibels - mel.CENTER_DB) / mel.SCALE_DB).T
    np.testing.assert_allclose(mel.log_mel(y, n_mels=N_MELS, frames=512), want, atol=1e-5)


def test_works_where_train_py_blocks_torch():
    """train.py sets sys.modules["torch"] = None; scipy (under librosa) used to fail on it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\nfrom bossa_jax import mel\n"
        "print(mel.log_mel(np.full(6400, 0.1, np.float32), n_mels=8, frames=10).shape)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "(10, 8)"


def test_clip_window_matches_the_codes_window_and_is_deterministic(cfg, tmp_path):
    # a 30 s file: the centred 508-frame clip starts at frame 750 - 254
    path = clicks(tmp_path / "long.wav", (15.0,), 30.0)
    feats, mask = mel.file_features(path, cfg)
    assert mask.sum() == 512
    assert abs(int(np.argmax(feats.mean(axis=1))) - (750 - 496)) <= 1
    again, _ = mel.file_features(path, cfg)
    np.testing.assert_array_equal(feats, again)


def test_config_ties_the_qformer_width_to_the_front_end():
    with pytest.raises(ConfigError, match="qformer.encoder_width.*audio.n_mels"):
        load_config("tiny", ["audio.frontend=mel", "data.audio_input=features"])
    with pytest.raises(ConfigError, match="data.audio_input"):
        load_config("tiny", [m for m in MEL if "audio_input" not in m] + ["data.audio_input=codes"])
    with pytest.raises(ConfigError, match="audio.frontend"):
        load_config("tiny", ["audio.frontend=spectrogram"])
    with pytest.raises(ConfigError, match="audio.n_mels"):
        load_config("tiny", ["audio.n_mels=0"])


def test_features_command_with_a_mel_config(cfg, tmp_path):
    inputs = [clicks(tmp_path / f"{i}.wav", (1.0 + i,), 6.0 + i) for i in range(3)]
    out = tmp_path / "feats.npz"
    argv = [*map(str, inputs), "--out", str(out), "--config", "tiny", *MEL, "--batch-size", "2"]
    assert features.main([*argv, "--no-progress"]) == 0
    with np.load(out) as data:
        assert data["features"].shape == (3, 512, N_MELS) and data["codes"].shape == (3, 0, 508)
        for i, path in enumerate(inputs):
            want, want_mask = mel.file_features(path, cfg)
            np.testing.assert_array_equal(data["features"][i], want)
            np.testing.assert_array_equal(data["masks"][i], want_mask)
    folder = tmp_path / "feats"
    assert features.main([*map(str, inputs), "--out", str(folder), "--config", "tiny", *MEL,
                          "--no-progress"]) == 0  # fmt: skip
    assert np.load(folder / "features.npy").shape == (3, 512, N_MELS)
    np.save(tmp_path / "codes.npy", np.zeros((4, 600), np.int16))
    with pytest.raises(ConfigError, match="not EnCodec codes"):
        features.main([str(tmp_path / "codes.npy"), "--out", str(tmp_path / "x.npz"),
                       "--config", "tiny", *MEL])  # fmt: skip


@pytest.mark.skipif(not sc.DEFAULT_SOUNDFONT.is_file(), reason="FluidSynth soundfont missing")
def test_stage1_features_path_trains_on_mel_frames(tmp_path):
    from bossa_jax.train import stage1

    manifest = sc.make_corpus(tmp_path / "corpus", songs=6, bars=6, seed=0)
    cfg = load_config(
        "tiny",
        [
            *MEL,
            "data.dataset=manifest",
            f"data.data_dir={manifest}",
            f"data.feature_cache_dir={tmp_path / 'cache'}",
            "data.feature_dtype=float32",
            "train.global_batch_size=2",
        ],
    )
    data = stage1.load_split(cfg, "train")  # no codes store anywhere
    assert len(data.index) > 0 and (tmp_path / "cache" / "train").is_dir()
    clips = data.index.clips[:2]
    audio_of = {r.id: r.audio for r in data.index.records}.__getitem__
    want, want_masks = mel.clips_fn(cfg, audio_of)(clips)
    got = data.audio.read_batch([0, 1])
    np.testing.assert_array_equal(got["features"], want)
    np.testing.assert_array_equal(got["audio_mask"], want_masks)
    local = next(stage1.train_data(cfg, data)(0, 1))
    spec = stage1.batch_spec(cfg, 2)
    assert set(spec) == set(local)
    for key, expected in spec.items():
        assert local[key].shape == expected.shape, key
    assert local["features"].shape == (2, 512, N_MELS)
