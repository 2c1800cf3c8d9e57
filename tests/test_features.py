"""bossa_jax/features.py: audio/codes -> codes, features, masks; batch-sharded over 8 fake CPU
devices with rule-placed parameters; every bad input is one line and no output (SPEC 1.1-1.3)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from flax import nnx
from jax.sharding import PartitionSpec as P

from bossa_jax import checkpoint, sharding
from bossa_jax.config import load_config
from bossa_jax.errors import DataError
from bossa_jax.features import (
    FeatureExtractor,
    encode_step,
    extract_features,
    features_step,
    main,
    write_features,
)
from bossa_jax.models.encodec import EncodecEncoder, config_section, encode_fn
from bossa_jax.models.musicgen import MusicgenFeatures, apply_features, save_musicgen

ROOT = Path(__file__).resolve().parent.parent
SR, HOP = 32000, 640
FRAMES = 50  # clip frames in these tests: 1 s clips keep them fast (the paper uses 508)
OVERRIDES = [f"audio.clip_frames={FRAMES}"]


def tone(seconds: float, freq: float = 440.0, amp: float = 0.4, rate: int = SR) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wobble = 0.1 * np.sin(2 * np.pi * 3.0 * t)
    return (amp * np.sin(2 * np.pi * freq * t + wobble)).astype(np.float32)


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES)


def random_module(ctor, seed: int):
    """``ctor()`` built abstractly, every parameter filled with seeded noise (scales near 1).
    Much faster than running the initialisers eagerly."""
    module = nnx.eval_shape(ctor)
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            shape, dtype = var.get_value().shape, var.get_value().dtype
            noise = rng.standard_normal(shape).astype(np.float32)
            value = 1.0 + 0.1 * noise if path[-1] == "scale" else 0.3 * noise
            var.set_value(jnp.asarray(value, dtype))
    return module


def one_device(cfg):
    return sharding.make_mesh(cfg.mesh, jax.devices()[:1])


@pytest.fixture(scope="module")
def models(cfg):
    musicgen = random_module(lambda: MusicgenFeatures(cfg.musicgen, rngs=nnx.Rngs(0)), 0)
    encodec = random_module(lambda: EncodecEncoder(cfg.encodec, rngs=nnx.Rngs(1)), 1)
    return musicgen, encodec


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    musicgen, encodec = models
    save_musicgen(root / "musicgen", musicgen)
    checkpoint.save_module(root / "encodec", encodec, config_section(encodec.cfg))
    return root / "musicgen", root / "encodec"


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    specs = {"a.wav": (3.0, 440.0), "b.flac": (1.6, 220.0), "c.wav": (0.7, 330.0)}
    paths = []
    for name, (seconds, freq) in specs.items():
        soundfile.write(root / name, tone(seconds, freq), SR)
        paths.append(str(root / name))
    stereo = np.stack([tone(2.0, 550.0, rate=44100), tone(2.0, 660.0, rate=44100)], axis=1)
    soundfile.write(root / "d.wav", stereo, 44100)
    paths.append(str(root / "d.wav"))
    return paths


def test_codes_features_masks_and_one_compile(cfg, models, audio_files):
    musicgen, encodec = models
    extractor = FeatureExtractor(cfg, musicgen, encodec, batch_size=2, mesh=one_device(cfg))
    inputs = audio_files + audio_files[:1]  # 5 inputs: 3 batches of 2, the last one padded
    compiled = encode_step._cache_size(), features_step._cache_size()
    result = extract_features(inputs, extractor)
    # each step compiled at most once for this batch shape (0: shared with an earlier test)
    assert encode_step._cache_size() - compiled[0] <= 1
    assert features_step._cache_size() - compiled[1] <= 1
    assert result.codes.shape == (5, 4, FRAMES) and result.codes.dtype == np.int32
    assert result.features.shape == (5, FRAMES + 4, 32) and result.features.dtype == np.float32
    assert result.masks.shape == (5, FRAMES + 4)
    # c.wav is 0.7 s = 35 frames: padded with 2048 and masked after 35 + 4 positions
    assert (result.codes[2, :, 35:] == 2048).all() and (result.codes[2, :, :35] < 2048).all()
    np.testing.assert_array_equal(result.masks[2], np.r_[np.ones(39), np.zeros(FRAMES - 35)])
    assert result.masks[[0, 1, 3, 4]].all()
    np.testing.assert_array_equal(result.codes[4], result.codes[0])
    np.testing.assert_allclose(result.features[4], result.features[0], atol=1e-6)

    # the same numbers as the models called directly on the clip (a.wav: 3 s, centre 1 s)
    samples = tone(3.0, 440.0)[SR : SR + FRAMES * HOP]
    codes = encode_fn(*nnx.split(encodec), jnp.asarray(samples[None]))
    np.testing.assert_array_equal(np.asarray(codes)[0], result.codes[0])
    features = jax.jit(apply_features, static_argnums=0)(*nnx.split(musicgen), codes)
    np.testing.assert_allclose(np.asarray(features)[0], result.features[0], atol=1e-5)


def test_codes_npy_inputs_skip_encodec(cfg, models, audio_files, tmp_path):
    musicgen, encodec = models
    extractor = FeatureExtractor(cfg, musicgen, encodec, batch_size=2, mesh=one_device(cfg))
    from_audio = extract_features(audio_files[:2], extractor)
    long = np.random.default_rng(0).integers(0, 2048, (4, 3 * FRAMES)).astype(np.int16)
    np.save(tmp_path / "song.npy", long)
    np.save(tmp_path / "clip.npy", from_audio.codes[1])
    codes_only = FeatureExtractor(cfg, musicgen, None, batch_size=2, mesh=one_device(cfg))
    result = extract_features([tmp_path / "song.npy", tmp_path / "clip.npy"], codes_only)
    np.testing.assert_array_equal(result.codes[0], long[:, FRAMES : 2 * FRAMES])  # centre clip
    np.testing.assert_allclose(result.features[1], from_audio.features[1], atol=1e-5)
    assert result.masks.all()

    np.save(tmp_path / "bad.npy", np.zeros((3, 80), np.int32))
    with pytest.raises(DataError, match=r"bad\.npy: expected integer EnCodec codes \(4, frames\)"):
        extract_features([tmp_path / "bad.npy"], codes_only)
    np.save(tmp_path / "range.npy", np.full((4, 80), 2048, np.int32))
    with pytest.raises(DataError, match=r"range\.npy: codes must be in \[0, 2047\]"):
        extract_features([tmp_path / "range.npy"], codes_only)
    with pytest.raises(Exception, match=r"wav: audio input needs an EnCodec checkpoint"):
        extract_features(audio_files[:1], codes_only)


SHARDED_SPECS = {
    "layers.mlp.fc1.kernel": P(None, "fsdp", "tensor"),
    "layers.mlp.fc2.kernel": P(None, "tensor", "fsdp"),
    "layers.self_attn.q_proj.kernel": P(None, "fsdp", "tensor"),
    "layers.self_attn.out_proj.kernel": P(None, "tensor", "fsdp"),
    "layers.final_layer_norm.scale": P(None, "fsdp"),
    "embed_tokens.embedding": P(None, "fsdp"),
    "layer_norm.scale": P("fsdp"),
}


def test_sharded_over_8_devices_equals_one_device(cfg, models, audio_files):
    """mesh data=2 x fsdp=2 x tensor=2: batch over data x fsdp, weights over fsdp and tensor."""
    assert jax.device_count() == 8
    musicgen, encodec = models
    single = FeatureExtractor(cfg, musicgen, encodec, batch_size=8, mesh=one_device(cfg))
    shape = ["mesh.shape.data=2", "mesh.shape.fsdp=2", "mesh.shape.tensor=2"]
    sharded_cfg = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES + shape)
    sharded = FeatureExtractor(sharded_cfg, musicgen, encodec, batch_size=8)
    assert sharded.mesh.devices.size == 8
    want = extract_features(audio_files, single)
    got = extract_features(audio_files, sharded)
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_allclose(got.features, want.features, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(got.masks, want.masks)

    params = {
        ".".join(map(str, path)): value for path, value in nnx.to_flat_state(sharded.musicgen_state)
    }
    for name, spec in SHARDED_SPECS.items():
        assert params[name].sharding.spec == spec, name
    assert all(len(v.sharding.device_set) == 8 for v in params.values())


def test_batch_size_must_divide_over_the_batch_axes(cfg, models):
    shard_cfg = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES)
    with pytest.raises(Exception, match="batch size 6 must be a positive multiple"):
        FeatureExtractor(shard_cfg, models[0], models[1], batch_size=6)


def test_command_writes_npz_and_directory(cfg, checkpoints, audio_files, tmp_path):
    musicgen_path, encodec_path = checkpoints
    common = [
        "--musicgen", str(musicgen_path), "--encodec", str(encodec_path),
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--batch-size", "8", *OVERRIDES,
    ]  # fmt: skip
    assert main([*audio_files, "--out", str(tmp_path / "f.npz"), *common]) == 0
    assert main([*audio_files, "--out", str(tmp_path / "dir"), *common]) == 0
    archive = np.load(tmp_path / "f.npz")
    assert archive["features"].shape == (4, FRAMES + 4, 32)
    assert list(archive["files"]) == audio_files
    for name in ("codes", "features", "masks"):
        np.testing.assert_array_equal(np.load(tmp_path / "dir" / f"{name}.npy"), archive[name])
    assert (tmp_path / "dir" / "files.txt").read_text().split() == audio_files
    assert sorted(os.listdir(tmp_path)) == ["dir", "f.npz"]  # no temporary leftovers


def _bad_specimens(root: Path) -> dict[str, Path]:
    good = root / "good.wav"
    soundfile.write(good, tone(2.0), SR)
    raw = good.read_bytes()
    specimens = {"missing": root / "missing.wav"}
    (root / "empty.wav").write_bytes(b"")
    specimens["empty"] = root / "empty.wav"
    (root / "text.wav").write_text("not audio at all\n" * 50)
    specimens["text"] = root / "text.wav"
    (root / "corrupt.wav").write_bytes(raw[:8] + b"XXXXXXXX" + raw[16:])
    specimens["corrupt"] = root / "corrupt.wav"
    soundfile.write(root / "silence.wav", np.zeros(2 * SR, np.float32), SR)
    specimens["silence"] = root / "silence.wav"
    soundfile.write(root / "short.wav", tone(0.3), SR)
    specimens["short"] = root / "short.wav"
    return specimens


def test_every_bad_audio_file_is_one_line_and_no_output(checkpoints, tmp_path, capsys):
    from bossa_jax.errors import run_cli

    musicgen_path, encodec_path = checkpoints
    good = tmp_path / "ok.wav"
    soundfile.write(good, tone(1.5), SR)
    for kind, path in _bad_specimens(tmp_path).items():
        out = tmp_path / f"out_{kind}.npz"
        argv = [
            str(good), str(path), "--out", str(out), "--musicgen", str(musicgen_path),
            "--encodec", str(encodec_path), "--config", str(ROOT / "configs" / "tiny.yaml"),
            *OVERRIDES,
        ]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, argv)
        assert exit_info.value.code != 0, kind
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], (kind, lines)
        assert not out.exists(), kind
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".out", "out"))]


def test_command_in_a_subprocess(checkpoints, tmp_path):
    musicgen_path, encodec_path = checkpoints
    bad = _bad_specimens(tmp_path)["corrupt"]
    out = tmp_path / "feats"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bossa_jax.features",
            str(bad),
            "--out",
            str(out),
            "--musicgen",
            str(musicgen_path),
            "--encodec",
            str(encodec_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "corrupt" in lines[0], proc.stderr
    assert not out.exists()


def test_no_inputs_is_an_error(cfg, models):
    extractor = FeatureExtractor(cfg, models[0], models[1], batch_size=1, mesh=one_device(cfg))
    with pytest.raises(DataError, match="no input files"):
        write_features("x.npz", [], extractor)


def test_random_init_smoke_run_and_missing_checkpoint(audio_files, tmp_path, capsys):
    from bossa_jax.errors import ConfigError
    from bossa_jax.features import main

    out = tmp_path / "smoke.npz"
    tiny = str(ROOT / "configs" / "tiny.yaml")
    assert (
        main(
            [
                str(audio_files[0]),
                "--config",
                tiny,
                "--random-init",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "smoke tests only" in capsys.readouterr().out
    with np.load(out) as data:
        assert data["features"].shape[:2] == (1, 512) and np.isfinite(data["features"]).all()
    with pytest.raises(ConfigError, match="--random-init"):
        main([str(audio_files[0]), "--config", tiny, "--out", str(tmp_path / "x.npz")])
