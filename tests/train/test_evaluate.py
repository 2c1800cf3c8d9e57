"""Retrieval evaluation (bossa_jax/train/evaluate.py): the metrics on hand-computed similarity
matrices, the end-to-end path on a tiny model + synthetic corpus checked against a direct
computation with the positives on the diagonal, and a codes-mode run with a converted MusicGen:
evaluation uses exactly the model the run trained (a random MusicGen gives other scores), codes
mode without MusicGen is refused, and ``export`` -> ``stage1.init_from`` gives the same weights."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from bossa_jax import sharding
from bossa_jax.config import load_config
from bossa_jax.errors import ConfigError, DataError, OutputError
from bossa_jax.train import evaluate, stage1


def test_ranks_and_metrics_hand_computed():
    sim = np.array(
        [
            [0.9, 0.1, 0.3],  # positive 0 is the best: rank 1
            [0.2, 0.5, 0.7],  # positive 1 (0.5) is beaten by 0.7: rank 2
            [0.4, 0.4, 0.1],  # positive 0 ties with candidate 1: ties count against it, rank 2
        ]
    )
    positives = [0, 1, 0]
    np.testing.assert_array_equal(evaluate.positive_ranks(sim, positives), [1, 2, 2])
    metrics = evaluate.retrieval_metrics(sim, positives)
    assert metrics == {"acc@1": pytest.approx(1 / 3), "acc@5": 1.0, "mean_rank": 5 / 3}


def test_rank_beyond_five_and_positions_off_the_diagonal():
    # 7 candidates: audio 0's positive is candidate 6 (the lowest score) -> rank 7, not in top 5;
    # audio 1's positive is candidate 3 (second best) -> rank 2
    sim = np.array(
        [
            [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
            [0.0, 0.1, 0.9, 0.8, 0.2, 0.3, 0.4],
        ]
    )
    np.testing.assert_array_equal(evaluate.positive_ranks(sim, [6, 3]), [7, 2])
    metrics = evaluate.retrieval_metrics(sim, [6, 3])
    assert metrics == {"acc@1": 0.0, "acc@5": 0.5, "mean_rank": 4.5}
    # a collapsed model (all scores equal) ranks every positive last
    np.testing.assert_array_equal(evaluate.positive_ranks(np.zeros((3, 3)), [0, 1, 2]), [3, 3, 3])
    with pytest.raises(ValueError):
        evaluate.positive_ranks(sim, [7, 0])


def test_summary_mean_and_standard_error():
    rounds = [{"acc@1": 0.5}, {"acc@1": 0.7}, {"acc@1": 0.6}]
    out = evaluate.summarize(rounds)["acc@1"]
    assert out["mean"] == pytest.approx(0.6)
    assert out["stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert evaluate.summarize([{"x": 2.0}])["x"] == {"mean": 2.0, "stderr": 0.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_corpus")
    cfg = load_config(
        "tiny",
        [
            f"data.data_dir={root}",
            "data.synthetic_songs=5",  # 1 test song: 6 windows
            "data.audio_input=features",
            "qformer.num_hidden_layers=2",
        ],
    )
    data = stage1.load_split(cfg, "test")
    model = stage1.model_fn(cfg)()
    # move the weights off their init so the ranking is not decided by ties
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return cfg, data, nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_end_to_end_matches_direct_ranking(tiny, tmp_path):
    cfg, data, model = tiny
    options = evaluate.RetrievalOptions(pairs=5, rounds=3, seed=1)
    report = evaluate.evaluate_retrieval(model, data, options)
    assert report["split"] == "test" and len(report["per_round"]) == 3
    draws = [tuple(r["example_ids"]) for r in report["per_round"]]
    assert len(set(draws)) > 1  # every round draws its own pairs
    for r in report["per_round"]:
        ids = r["example_ids"]
        assert len(set(ids)) == 5 and set(ids) <= set(data.usable)
        # independent path: the pairs in drawn order, positives on the diagonal, argsort ranks
        batch = evaluate.round_batch(data, ids, None, deperf=True)
        sim = np.asarray(
            model.retrieval_similarity(
                batch["audio_mask"],
                batch["notes"],
                batch["leadsheet_mask"],
                batch["pad_mask"],
                features=batch["features"],
            )
        )
        order = np.argsort(-sim, axis=1, kind="stable")
        ranks = 1 + np.array([int(np.where(order[i] == i)[0][0]) for i in range(5)])
        assert r["acc@1"] == pytest.approx(np.mean(ranks == 1))
        assert r["acc@5"] == pytest.approx(np.mean(ranks <= 5))
        assert r["mean_rank"] == pytest.approx(np.mean(ranks))
    mean_rank = [r["mean_rank"] for r in report["per_round"]]
    assert report["summary"]["mean_rank"]["mean"] == pytest.approx(np.mean(mean_rank))
    out = evaluate.write_report(report, tmp_path / "r.json")
    assert json.loads(out.read_text())["summary"] == report["summary"]


def test_too_few_test_windows_is_one_line(tiny):
    _, data, model = tiny
    with pytest.raises(DataError, match="fewer than --pairs 128"):
        evaluate.evaluate_retrieval(model, data, evaluate.RetrievalOptions(pairs=128))


# --- codes mode: the model the run trained, with its converted MusicGen (issue 8 item 1) --------
def _numpy_state(hf) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in hf.state_dict().items()}


@pytest.fixture(scope="module")
def codes_run(tmp_path_factory):
    """A 2-step codes-mode run whose frozen MusicGen is a tiny HF MusicGen converted by
    convert.musicgen (random, and different from the seed-built random MusicGen)."""
    import torch
    from transformers import MusicgenForConditionalGeneration

    from bossa_jax.models.musicgen import save_musicgen
    from convert.musicgen import convert_musicgen
    from tests.models.test_musicgen import hf_configs, randomize

    tmp = tmp_path_factory.mktemp("codes_run")
    torch.manual_seed(4)
    hf = MusicgenForConditionalGeneration(hf_configs(2)).eval()
    randomize(hf, seed=4)
    converted = convert_musicgen(_numpy_state(hf), keep_layers=1, hf_config=hf.config.to_dict())
    save_musicgen(tmp / "musicgen", converted)
    cfg = load_config(
        "tiny",
        [
            f"data.data_dir={tmp / 'corpus'}",
            "data.synthetic_songs=5",  # 1 test song: 6 windows
            f"data.musicgen_checkpoint={tmp / 'musicgen'}",
            "data.random_musicgen=false",
            f"train.out_dir={tmp / 'run'}",
            "train.total_steps=2",
            "train.optim.warmup_steps=1",
            "train.eval_every=0",
            "train.log_every=1",
            "musicgen.keep_layers=1",
            "qformer.num_hidden_layers=2",
        ],
    )
    result = stage1.run(cfg)
    assert result.step == 2
    return cfg, result, tmp


def _trained_model(cfg, result, musicgen_path=None):
    """The model the run trained, put together here: fresh model, the converted MusicGen read
    directly from its checkpoint (None: the seeded random one eval used to build), the trainable
    weights the loop returned."""
    from bossa_jax.models.musicgen import load_musicgen

    model = stage1.model_fn(cfg)()
    if musicgen_path is not None:
        nnx.update(model.musicgen, nnx.state(load_musicgen(musicgen_path), nnx.Param))
    nnx.update(model, jax.device_get(result.state.params))
    return model


def _round_similarities(model, data, report):
    graphdef, state = nnx.split(model)
    sims = []
    for r in report["per_round"]:
        batch = evaluate.round_batch(data, r["example_ids"], None, deperf=True)
        sims.append(np.asarray(evaluate._similarity(graphdef, state, batch, "float32")))
    return sims


def test_eval_of_a_codes_run_uses_the_musicgen_it_trained_with(codes_run):
    cfg, result, tmp = codes_run
    data = stage1.load_split(cfg, "test")
    options = evaluate.RetrievalOptions(pairs=5, rounds=3, seed=2)
    direct = _trained_model(cfg, result, tmp / "musicgen")
    expected = evaluate.evaluate_retrieval(direct, data, options)
    evaluated = evaluate.load_model(cfg, tmp / "run")
    got = evaluate.evaluate_retrieval(evaluated, data, options)
    assert got["per_round"] == expected["per_round"]  # same draws, same ranks, same metrics
    for a, b in zip(
        _round_similarities(evaluated, data, got), _round_similarities(direct, data, got)
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # the run's weights with the seed's random MusicGen (what eval used to build) score otherwise
    shuffled = _trained_model(cfg, result)
    sims_random = _round_similarities(shuffled, data, got)
    sims_trained = _round_similarities(evaluated, data, got)
    # (two steps from its init the Q-Former barely looks at the audio, so the scores move a little,
    # yet far beyond the 1e-6 to which the same model reproduces them)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(sims_random, sims_trained)) > 2e-5
    # and a config that would build another MusicGen than the run's is refused, naming the key
    random_cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, musicgen_checkpoint="", random_musicgen=True),
    )
    with pytest.raises(ConfigError) as err:
        evaluate.load_model(random_cfg, tmp / "run")
    message = str(err.value)
    assert "data.musicgen_checkpoint" in message and "config.yaml" in message
    assert "\n" not in message


def test_codes_mode_without_musicgen_is_refused(codes_run):
    cfg, _, tmp = codes_run
    no_musicgen = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, musicgen_checkpoint="", random_musicgen=False)
    )
    for refuse in (
        stage1.check_musicgen_source,  # before any data is read (stage1.run)
        # and in the one builder's init step (on an abstract model: it refuses before any write)
        lambda c: stage1.init_fn(c)(nnx.eval_shape(stage1.model_fn(c))),
    ):
        with pytest.raises(ConfigError) as err:
            refuse(no_musicgen)
        message = str(err.value)
        assert "data.musicgen_checkpoint" in message and "random_musicgen" in message
        assert "\n" not in message


def test_export_round_trips_through_init_from(codes_run):
    cfg, _, tmp = codes_run
    out = stage1.export(cfg, tmp / "run", tmp / "exported")
    run_model = evaluate.load_model(cfg, tmp / "run")
    # a new run started from the export: no MusicGen source but the exported checkpoint
    from_export = dataclasses.replace(
        cfg,
        stage1=dataclasses.replace(cfg.stage1, init_from=str(out)),
        data=dataclasses.replace(cfg.data, musicgen_checkpoint="", random_musicgen=False),
    )
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        started = stage1.build_model(from_export)
    expected = {
        p: np.asarray(v[...]) for p, v in nnx.iter_graph(run_model) if isinstance(v, nnx.Param)
    }
    got = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(started) if isinstance(v, nnx.Param)}
    assert got.keys() == expected.keys() and any(p[0] == "musicgen" for p in got)
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    with pytest.raises(OutputError, match="--overwrite"):  # checked before any work
        stage1.export(cfg, tmp / "run", out)


def test_a_damaged_stage1_checkpoint_reports_its_own_error(tmp_path):
    from bossa_jax.errors import CheckpointError
    from bossa_jax.models.bossa import Stage1Model, save_stage1

    cfg = load_config("tiny", ["data.audio_input=features", "qformer.num_hidden_layers=2"])
    save_stage1(tmp_path / "s1", Stage1Model(cfg.qformer, None, rngs=nnx.Rngs(0)))
    shutil.rmtree(tmp_path / "s1" / "params")
    with pytest.raises(CheckpointError) as err:
        evaluate.load_model(cfg, tmp_path / "s1")
    message = str(err.value)  # the loader's own error, not "no training checkpoint"
    assert "no params/" in message and "\n" not in message
