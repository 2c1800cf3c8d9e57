"""Pretrained initialisation of stage 1 (bossa_jax/train/stage1.py ``init_fn``): a saved Q-Former
lands in a fresh sharded Stage1Model with the same values and the model's shardings (8 devices:
data=2, fsdp=2, tensor=2); a Q-Former of another size is a one-line CheckpointError."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from bossa_jax import checkpoint, sharding
from bossa_jax.config import load_config
from bossa_jax.errors import CheckpointError, ConfigError
from bossa_jax.models.qformer import QFormer
from bossa_jax.train import stage1

MESH = "mesh.shape={data: 2, fsdp: 2, tensor: 2}"


def tiny(*overrides):
    return load_config(
        "tiny", ["musicgen.keep_layers=1", "qformer.num_hidden_layers=2", MESH, *overrides]
    )


def save_qformer(path, cfg, seed):
    model = QFormer(cfg, rngs=nnx.Rngs(seed))
    checkpoint.save_module(path, model, {"name": "musicbert", "qformer": dataclasses.asdict(cfg)})
    return model


def params_of(module):
    return {
        ".".join(map(str, p)): v[...] for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)
    }


def fresh_model(cfg):
    mesh = sharding.make_mesh(cfg.mesh)
    ctx = sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh))
    ctx.__enter__()
    return sharding.create_sharded(stage1.model_fn(cfg)), ctx


def test_qformer_init_values_and_shardings(tmp_path, caplog):
    cfg = tiny(f"stage1.qformer_init={tmp_path / 'qf'}")
    saved = params_of(save_qformer(tmp_path / "qf", cfg.qformer, seed=123))
    model, ctx = fresh_model(cfg)
    try:
        before = {k: (v.sharding, v.dtype) for k, v in params_of(model.qformer).items()}
        fresh = {k: np.asarray(v) for k, v in params_of(model.qformer).items()}
        heads_before = np.asarray(model.audio_proj.kernel[...])
        assert any(len(set(s.spec) - {None}) for s, _ in before.values())  # some are sharded
        with caplog.at_level(logging.WARNING, logger="bossa_jax.train"):
            model = stage1.init_fn(cfg)(model)
        after = params_of(model.qformer)
    finally:
        ctx.__exit__(None, None, None)
    assert after.keys() == saved.keys()
    differs = 0
    for key, value in after.items():
        sharding_before, dtype_before = before[key]
        assert value.sharding == sharding_before, key
        assert value.dtype == dtype_before, key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[key]), err_msg=key)
        differs += not np.array_equal(np.asarray(value), fresh[key])
    assert differs >= len(after) // 3  # the random kernels were replaced (biases/norms agree)
    # the heads are not part of the Q-Former checkpoint: left as created
    np.testing.assert_array_equal(np.asarray(model.audio_proj.kernel[...]), heads_before)
    # codes mode, no musicgen_checkpoint: one warning line
    warnings = [r.getMessage() for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]


def test_qformer_init_wrong_shape_is_one_line(tmp_path):
    cfg = tiny(f"stage1.qformer_init={tmp_path / 'qf'}")
    other = dataclasses.replace(cfg.qformer, intermediate_size=cfg.qformer.intermediate_size * 2)
    save_qformer(tmp_path / "qf", other, seed=1)
    model, ctx = fresh_model(cfg)
    try:
        with pytest.raises(CheckpointError) as err:
            stage1.init_fn(cfg)(model)
    finally:
        ctx.__exit__(None, None, None)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "qf") in message and "shape" in message
    assert "intermediate" in message or "mlp" in message


def test_init_missing_checkpoint_and_both_keys(tmp_path):
    cfg = tiny(f"stage1.qformer_init={tmp_path / 'nope'}")
    model = nnx.eval_shape(stage1.model_fn(cfg))
    with pytest.raises(Exception) as err:
        stage1.init_fn(cfg)(model)
    assert "stage1.qformer_init" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not both"):
        tiny("stage1.qformer_init=a", "stage1.init_from=b")


def test_init_from_stage1_checkpoint(tmp_path):
    from bossa_jax.models.bossa import Stage1Model, save_stage1

    cfg = tiny(f"stage1.init_from={tmp_path / 's1'}", "data.audio_input=features")
    source = Stage1Model(cfg.qformer, None, rngs=nnx.Rngs(5))
    save_stage1(tmp_path / "s1", source)
    model, ctx = fresh_model(cfg)
    try:
        before = {k: v.sharding for k, v in params_of(model).items()}
        model = stage1.init_fn(cfg)(model)
    finally:
        ctx.__exit__(None, None, None)
    expected = params_of(source)
    after = params_of(model)
    assert after.keys() == expected.keys()
    for key, value in after.items():
        assert value.sharding == before[key], key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[key]), err_msg=key)
    assert jax.device_count() == 8
