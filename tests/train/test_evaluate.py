"""Retrieval evaluation (bossa_jax/train/evaluate.py): the metrics on hand-computed similarity
matrices, and the end-to-end path on a tiny model + synthetic corpus checked against a direct
computation with the positives on the diagonal."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from bossa_jax.config import load_config
from bossa_jax.errors import DataError
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
            f"stage1.data_dir={root}",
            "stage1.synthetic_songs=5",  # 1 test song: 6 windows
            "stage1.audio_input=features",
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
