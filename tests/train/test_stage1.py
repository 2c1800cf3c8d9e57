"""The stage-1 step (bossa_jax/train/stage1.py): one sharded step on 8 devices (data=2, fsdp=4)
equals the same step on 1 device (loss, every metric, every updated parameter), MusicGen frozen
and outside the trainable set, bf16 layout, batch layout."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bossa_jax import sharding
from bossa_jax.config import load_config
from bossa_jax.data.pipeline import to_global
from bossa_jax.errors import ConfigError
from bossa_jax.models.bossa import TRAINABLE
from bossa_jax.train import stage1
from bossa_jax.train.step import batch_shardings, replicated_key

# CPU compile of the full stage-1 step dominates these tests: cheaper LLVM passes, same numerics
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 2e-5


def tiny_config(data_dir, *overrides):
    return load_config(
        "tiny",
        [
            f"data.data_dir={data_dir}",
            "data.synthetic_songs=4",
            "train.global_batch_size=8",
            "musicgen.keep_layers=1",
            "qformer.num_hidden_layers=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1_corpus")
    return stage1.write_synthetic_corpus(root, songs=4, bars=16)


def one_step(cfg, mesh, local_batch):
    """(metrics, updated trainable params, frozen state before/after) of one train step."""
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        program = stage1.build_stage1_program(cfg, mesh)
        shardings = batch_shardings(mesh, local_batch)
        batch = to_global(local_batch, mesh)
        rng = replicated_key(7, mesh)
        frozen_before = jax.tree.map(np.asarray, program.frozen)
        step = program.train_step(shardings).lower(program.state, program.frozen, batch, rng)
        step = step.compile(compiler_options=FAST_COMPILE)
        state, metrics = step(program.state, program.frozen, batch, rng)
        return (
            jax.device_get(metrics),
            state.params,
            frozen_before,
            jax.tree.map(np.asarray, program.frozen),
        )


def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def fp32_step(corpus, tmp_path_factory):
    """(first train batch, metrics, updated trainable params, frozen state before/after; numpy,
    the trees flattened as :func:`flat` does) of the fp32 step on one device: the reference of
    both the sharded and the bf16 step, computed once per session. pytest-xdist's workers share
    it through a file in the session's temp root (the parent of their own): the first to take
    the lock computes it, the other waits instead of compiling the same step."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    saved = root / "stage1-fp32-step.pkl"
    with _locked(root / "stage1-fp32-step.lock"):
        if not saved.is_file():
            cfg = tiny_config(corpus, "train.compute_dtype=float32")
            local = next(stage1.train_data(cfg, stage1.load_split(cfg, "train"))(0, 1))
            mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
            metrics, params, frozen, frozen_after = one_step(cfg, mesh, local)
            result = (local, metrics, flat(params), flat(frozen), flat(frozen_after))
            with open(saved.with_suffix(".tmp"), "wb") as f:
                pickle.dump(jax.device_get(result), f)
            saved.with_suffix(".tmp").rename(saved)
        with open(saved, "rb") as f:
            return pickle.load(f)


def test_sharded_step_equals_single_device(corpus, fp32_step):
    local, m1, f1, frozen1, frozen1_after = fp32_step
    assert set(local) == {"notes", "leadsheet_mask", "pad_mask", "audio_mask", "codes"}
    cfg8 = tiny_config(corpus, "train.compute_dtype=float32", "mesh.shape={data: 2, fsdp: 4}")
    mesh8 = sharding.make_mesh(cfg8.mesh)
    m8, p8, _, _ = one_step(cfg8, mesh8, local)

    # the logged terms: total, ITC, ITM, ITG, the 8 per-field LM losses, temperature, grad norm
    fields = ("bar", "pos", "inst", "pitch", "dur", "vel", "ts", "tempo")
    expected = {"loss", "itc", "itm", "itg", "temp", "grad_norm", *(f"itg_{f}" for f in fields)}
    assert set(m1) == expected
    assert np.isfinite(m1["loss"])
    np.testing.assert_allclose(m1["loss"], m1["itc"] + m1["itm"] + m1["itg"], rtol=1e-6)
    for name in expected:
        np.testing.assert_allclose(m8[name], m1[name], rtol=TOL, atol=TOL, err_msg=name)

    # the updated parameters, sharded on 8 devices, equal the single-device ones
    f8 = flat(p8)
    assert f1.keys() == f8.keys()
    worst = max(float(np.max(np.abs(f1[k] - f8[k]))) for k in f1)
    assert worst <= TOL, worst
    specs = {
        jax.tree_util.keystr(k): v.sharding.spec
        for k, v in jax.tree_util.tree_flatten_with_path(p8)[0]
    }
    fc1 = next(v for k, v in specs.items() if "query_mlp" in k and "fc1" in k and "kernel" in k)
    assert fc1[0] == "fsdp", fc1  # (embed, mlp) -> (fsdp, tensor): FSDP-sharded master weights

    # MusicGen is frozen: not in the trainable state, untouched by the step
    assert not any("musicgen" in k for k in f1)
    assert any("musicgen" in k for k in frozen1)
    for k, v in frozen1.items():
        np.testing.assert_array_equal(frozen1_after[k], v, err_msg=k)


def test_bf16_layout_and_trainable_filter():
    cfg = load_config("tiny", ["train.compute_dtype=bfloat16"])
    model = nnx.eval_shape(stage1.model_fn(cfg))
    _, params, frozen = nnx.split(model, TRAINABLE, ...)
    param_dtypes = {x.dtype for x in jax.tree.leaves(params)}
    assert param_dtypes == {jnp.dtype(jnp.float32)}  # fp32 master weights
    frozen_flat = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(frozen)[0]
    }
    assert frozen_flat and all("musicgen" in k for k in frozen_flat)
    matrices = [v for k, v in frozen_flat.items() if len(v.shape) >= 2 and "norm" not in k]
    assert matrices and all(v.dtype == jnp.bfloat16 for v in matrices)  # frozen MusicGen in bf16
    # features mode: no MusicGen at all
    cfg = load_config("tiny", ["data.audio_input=features"])
    model = nnx.eval_shape(stage1.model_fn(cfg))
    assert model.musicgen is None


@pytest.mark.parametrize("audio_input", ["codes", "features"])
def test_batch_spec_matches_pipeline(corpus, audio_input):
    cfg = tiny_config(corpus, f"data.audio_input={audio_input}", "train.global_batch_size=4")
    local = next(stage1.train_data(cfg, stage1.load_split(cfg, "train"))(0, 1))
    spec = stage1.batch_spec(cfg, 4)
    assert set(spec) == set(local)
    for key, want in spec.items():
        assert local[key].shape == want.shape, key
        assert np.dtype(local[key].dtype) == np.dtype(want.dtype), key


# bf16 compute (fp32 master weights, bf16 frozen MusicGen) against fp32 on the tiny config:
# measured |diff| 5.5e-4 for the total and ITC, <= 1e-4 for ITM, ITG and the 8 field losses
# (losses 0.7-10); the tolerance allows about 10x that, far below what a wrong cast or lost fp32
# statistics would move
BF16_TOL = 5e-3


def test_bf16_step_matches_fp32_losses(corpus, fp32_step):
    """One bf16 train step gives the fp32 step's losses within BF16_TOL (same weights, batch and
    dropout key), and its updated parameters stay fp32."""
    local, m32 = fp32_step[:2]
    cfg16 = tiny_config(corpus, "train.compute_dtype=bfloat16")
    m16, p16, _, _ = one_step(cfg16, sharding.make_mesh(cfg16.mesh, jax.devices()[:1]), local)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
    for name in ("loss", "itc", "itm", "itg", *(k for k in m32 if k.startswith("itg_"))):
        assert np.isfinite(m16[name]), name
        np.testing.assert_allclose(m16[name], m32[name], rtol=0, atol=BF16_TOL, err_msg=name)
    assert m16["loss"] != m32["loss"]  # the bf16 path really computed in bf16


def test_feature_dtype_float16_cache_and_a_mismatched_cache_is_refused(corpus, tmp_path):
    options = ("data.audio_input=features", f"data.feature_cache_dir={tmp_path}")
    cfg = tiny_config(corpus, *options, "data.feature_dtype=float16", "train.global_batch_size=4")
    local = next(stage1.train_data(cfg, stage1.load_split(cfg, "train"))(0, 1))
    assert local["features"].dtype == np.float16
    assert stage1.batch_spec(cfg, 4)["features"].dtype == jnp.float16
    with pytest.raises(ConfigError, match="data.feature_dtype"):
        stage1.load_split(tiny_config(corpus, *options), "train")  # bfloat16 config, fp16 cache


def test_official_data_options_reach_the_pipeline(corpus):
    """data.clamp_clips=false gives the official empty clips near a song's start (SPEC 10.12);
    data.keep_eos=false reaches the sequence builder (SPEC 11.11)."""
    ours = stage1.load_split(tiny_config(corpus), "train")
    cfg = tiny_config(corpus, "data.clamp_clips=false", "data.keep_eos=false")
    official = stage1.load_split(cfg, "train")
    assert min(c.frames for c in ours.index.clips) > 0
    assert any(c.frames == 0 for c in official.index.clips)
    assert stage1.make_pipeline(cfg, official, 0, 1).options.keep_eos is False
    assert stage1.make_pipeline(tiny_config(corpus), ours, 0, 1).options.keep_eos is True
