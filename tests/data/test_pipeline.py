"""Stage-1/2 grain pipelines: contents, determinism, restore in a new process, process shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bossa_jax import sharding
from bossa_jax.config import MeshConfig
from bossa_jax.data import feature_cache as fc
from bossa_jax.data import pipeline as pl
from bossa_jax.data import readers, synthetic
from bossa_jax.errors import DataError
from bossa_jax.symbolic import octuple, remi, segment
from tests.data.data_fixtures import load_index, make_pipeline, write_corpus

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_stage1_batch_contents_match_symbolic_layer(corpus):
    index, codes = load_index(corpus)
    batch = next(make_pipeline(corpus, stage=1, seed=3).iterator())
    assert batch["notes"].shape == (4, 226 * 8) and batch["notes"].dtype == np.int32
    assert batch["leadsheet_mask"].shape == batch["pad_mask"].shape == (4, 226)
    assert batch["codes"].shape == (4, 4, 508) and batch["audio_mask"].shape == (4, 512)
    for row, (eid, shift) in enumerate(zip(batch["example_id"], batch["transposition"])):
        assert -6 <= shift <= 5
        window = index.examples[eid].window
        arr = segment.transpose(window.arrangement, int(shift))
        lead = segment.transpose(window.leadsheet, int(shift))
        ids, ls_mask, pad_mask = octuple.stage1_sequence(arr, lead, deperf=True)
        np.testing.assert_array_equal(batch["notes"][row], ids)
        np.testing.assert_array_equal(batch["leadsheet_mask"][row], ls_mask)
        np.testing.assert_array_equal(batch["pad_mask"][row], pad_mask)
        song = codes.codes(index.song_id(eid))
        start = window.clip_start
        np.testing.assert_array_equal(batch["codes"][row], song[:, start : start + 508])
        assert 0 <= start <= song.shape[1] - 508  # clamped into the song (SPEC 10.12)


def test_codes_follow_the_index_clip_length(corpus):
    """``audio.clip_frames`` other than 508 reaches the codes batches: (B, 4, L) and (B, L + 4)."""
    records, _ = readers.read_songs(readers.pop909_sources(corpus / "pop909", corpus / "audio"))
    codes = fc.CodesStore(corpus / "codes")
    index = pl.build_index(records, codes, clip_length=100)
    audio = pl.AudioSource(index, codes=codes).read_batch([0, 1])
    assert audio["codes"].shape == (2, 4, 100) and audio["audio_mask"].shape == (2, 104)
    for row, example in enumerate(index.examples[:2]):
        start = example.window.clip_start
        song = codes.codes(index.song_id(example.example_id))
        np.testing.assert_array_equal(audio["codes"][row], song[:, start : start + 100])


def test_stage2_batch_contents_and_cached_features(corpus, tmp_path):
    index, codes = load_index(corpus)
    cache = fc.build_feature_cache(
        tmp_path / "f", index.clips, codes.codes, synthetic.fake_features, compute_id="f",
        progress=False,
    )  # fmt: skip
    options = pl.PipelineOptions(stage=2, global_batch_size=4, seed=5, num_threads=1)
    pipe = pl.Pipeline(index, pl.AudioSource(index, features=cache), options)
    batch = next(pipe.iterator())
    assert batch["tokens"].shape == (4, 1000) and batch["control_mask"].dtype == bool
    assert batch["features"].shape == (4, 512, 16) and "codes" not in batch
    for row, (eid, shift) in enumerate(zip(batch["example_id"], batch["transposition"])):
        window = index.examples[eid].window
        arr = segment.transpose(window.arrangement, int(shift))
        lead = segment.transpose(window.leadsheet, int(shift))
        ids, control, pad = remi.stage2_sequence(arr, lead, redact=True)
        np.testing.assert_array_equal(batch["tokens"][row], ids)
        np.testing.assert_array_equal(batch["control_mask"][row], control)
        np.testing.assert_array_equal(batch["pad_mask"][row], pad)
        np.testing.assert_array_equal(
            batch["features"][row].view(np.uint16), cache[int(eid)]["features"].view(np.uint16)
        )


def test_same_seed_same_batches_new_seed_new_order(corpus):
    a = take(make_pipeline(corpus, seed=7, num_epochs=2).iterator(), 8)
    b = take(make_pipeline(corpus, seed=7, num_epochs=2).iterator(), 8)
    assert_same_batches(a, b)
    c = take(make_pipeline(corpus, seed=8, num_epochs=2).iterator(), 8)
    assert [x["example_id"].tolist() for x in a] != [x["example_id"].tolist() for x in c]
    # 18 windows, global batch 4: 4 steps (16 examples) per epoch, distinct, reshuffled per epoch
    pipe = make_pipeline(corpus, seed=7, num_epochs=2)
    assert pipe.steps_per_epoch == 4
    epoch0 = np.concatenate([x["example_id"] for x in a[:4]])
    epoch1 = np.concatenate([x["example_id"] for x in a[4:]])
    assert len(set(epoch0.tolist())) == len(set(epoch1.tolist())) == 16
    assert epoch0.tolist() != epoch1.tolist()
    with pytest.raises(StopIteration):
        take(pipe.iterator(), 9)


def test_state_restored_in_a_new_process_continues_identically(corpus, tmp_path):
    options = {"seed": 11, "stage": 1}
    iterator = make_pipeline(corpus, **options).iterator()
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 3)  # batches 3..5 cross the epoch boundary at 4
    (tmp_path / "state.json").write_text(json.dumps(state))
    out = tmp_path / "restored.npz"
    subprocess.run(
        [sys.executable, str(HERE / "restore_worker.py"), str(corpus), json.dumps(options),
         str(tmp_path / "state.json"), "3", str(out)],
        check=True, timeout=120,
    )  # fmt: skip
    with np.load(out) as data:
        restored = [{k: data[f"{i}/{k}"] for k in expected[i]} for i in range(3)]
    assert_same_batches(expected, restored)


def test_two_processes_see_disjoint_halves_of_each_global_batch(corpus):
    whole = take(make_pipeline(corpus, seed=2, num_epochs=1).iterator(), 4)
    halves = [
        take(make_pipeline(corpus, seed=2, num_epochs=1, process_index=p, process_count=2)
             .iterator(), 4)
        for p in range(2)
    ]  # fmt: skip
    seen = [set(), set()]
    for step in range(4):
        ids0, ids1 = (halves[p][step]["example_id"].tolist() for p in range(2))
        assert len(ids0) == len(ids1) == 2
        assert not set(ids0) & set(ids1)
        assert sorted(ids0 + ids1) == sorted(whole[step]["example_id"].tolist())
        # the same example gets the same transposition whatever the process count
        by_id = dict(zip(whole[step]["example_id"].tolist(), whole[step]["transposition"]))
        for p in range(2):
            for eid, shift in zip(halves[p][step]["example_id"], halves[p][step]["transposition"]):
                assert by_id[int(eid)] == shift
        seen[0].update(ids0)
        seen[1].update(ids1)
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 8


def test_global_arrays_on_a_mesh(corpus):
    mesh_cfg = MeshConfig(shape={"data": 4, "fsdp": 1, "tensor": 1})
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4])
    batch = next(make_pipeline(corpus, seed=0).iterator())
    arrays = pl.to_global(batch, mesh, sharding.rules_of(mesh_cfg))
    assert arrays["notes"].shape == (4, 1808)
    assert arrays["notes"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(arrays["codes"]), batch["codes"])


def test_bad_options_are_errors(corpus):
    with pytest.raises(DataError, match="does not divide"):
        make_pipeline(corpus, global_batch_size=3, process_count=2, process_index=0)
    with pytest.raises(DataError, match="do not fill one global batch"):
        make_pipeline(corpus, global_batch_size=64)


def test_symbolic_sample_passes_keep_eos():
    """keep_eos=False (configs/official.yaml) reaches both sequence builders (SPEC 11.11)."""
    from bossa_jax.symbolic.notes import NoteTable

    def table(pitch, n):
        events = np.tile([[0, 0, 0, pitch, 1, 1, 9, 35]], (n, 1))
        return NoteTable(events, np.zeros(n))

    window = segment.Window(0, 0, 0.0, 8.0, 0, 508, table(60, 300), table(72, 10))
    eos_ids = {1: octuple.EOS, 2: remi.to_ids(["</s>"])[0]}

    def last_token(sample, stage):
        if stage == 1:
            return sample["notes"].reshape(-1, 8)[sample["pad_mask"] > 0][-1, 0]
        return sample["tokens"][~sample["pad_mask"]][-1]

    for stage in (1, 2):
        ours = pl.symbolic_sample(window, stage, None)
        official = pl.symbolic_sample(window, stage, None, keep_eos=False)
        assert last_token(ours, stage) == eos_ids[stage], stage
        assert last_token(official, stage) != eos_ids[stage], stage
