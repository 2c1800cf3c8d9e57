"""Codes store from audio (bossa_jax/data/codes.py): a 2-song synthetic corpus plus one broken
audio file, a tiny random EnCodec saved as a checkpoint; the store holds (4, ceil(samples/640))
codes per song, the first chunk equals a direct encode of it, the bad song is skipped and
counted, and a second run resumes (encodes nothing)."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from bossa_jax import checkpoint, sharding
from bossa_jax.config import EncodecConfig
from bossa_jax.data import codes, readers, synthetic
from bossa_jax.models.encodec import EncodecEncoder, config_section

CFG = EncodecConfig(num_filters=4, hidden_size=16, num_lstm_layers=1, codebook_dim=16)
CHUNK_SECONDS = 3.0


def test_codes_store_from_audio(tmp_path):
    for i, name in enumerate(["001", "002", "003"]):
        synthetic.write_pop909_song(
            tmp_path / "pop909", name, bars=4, seed=i, audio_root=tmp_path / "audio"
        )
    (tmp_path / "audio" / "003.wav").write_bytes(b"RIFF not really a wav file")
    model = sharding.create_sharded(lambda: EncodecEncoder(CFG, rngs=nnx.Rngs(3)))
    checkpoint.save_module(tmp_path / "encodec", model, config_section(CFG))

    out = tmp_path / "codes"
    rc = codes.main(
        [
            "--encodec", str(tmp_path / "encodec"), "--dataset", "pop909",
            "--data-dir", str(tmp_path / "pop909"), "--audio-dir", str(tmp_path / "audio"),
            "--out", str(out), "--chunk-seconds", str(CHUNK_SECONDS),
        ]
    )  # fmt: skip
    assert rc == 0
    store = codes.fc.CodesStore(out)
    assert "pop909/001" in store and "pop909/002" in store and "pop909/003" not in store
    chunk = int(CHUNK_SECONDS * 32000)
    for name in ("001", "002"):
        samples = codes.load_whole(tmp_path / "audio" / f"{name}.wav")
        got = store.codes(f"pop909/{name}")
        assert got.shape == (4, math.ceil(samples.size / 640))
        assert store.num_frames(f"pop909/{name}") == got.shape[1]
        assert got.min() >= 0 and got.max() < CFG.codebook_size
        assert len(np.unique(got)) > 8  # not a constant code
        direct = np.asarray(model.encode(samples[None, :chunk]))[0]
        np.testing.assert_array_equal(got[:, : chunk // 640], direct)

    # resumable: a complete store is reused, nothing is encoded again
    def fail(_):
        raise AssertionError("encoded again")

    sources = readers.pop909_sources(tmp_path / "pop909", tmp_path / "audio")
    again, skipped = codes.build_from_audio(
        out, sources, fail, compute_id=f"encodec:{(tmp_path / 'encodec').resolve()}",
        chunk_seconds=CHUNK_SECONDS, progress=False,
    )  # fmt: skip
    assert skipped == 1
    np.testing.assert_array_equal(again.codes("pop909/002"), store.codes("pop909/002"))
