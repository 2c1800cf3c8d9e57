"""Training checkpoints: train state + rng + data-iterator state, restored into abstract targets
with the current shardings; keep-N; existing steps never overwritten."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bossa_jax.config import MeshConfig, OptimConfig
from bossa_jax.errors import CheckpointError
from bossa_jax.sharding import create_sharded, make_mesh, use_mesh
from bossa_jax.train.checkpoint import TrainCheckpointer
from bossa_jax.train.optim import make_optimizer
from bossa_jax.train.step import abstract_like, build_program, replicated_key, trainable_filter
from tests.train.toy import FROZEN, make_model, toy_loss, toy_pipeline


def _program(mesh_shape):
    cfg = MeshConfig(shape=mesh_shape)
    mesh = make_mesh(cfg)
    with use_mesh(mesh, cfg.rules):
        model = create_sharded(make_model)
        tx = make_optimizer(OptimConfig(warmup_steps=2), 10)
        return build_program(model, trainable_filter(*FROZEN), toy_loss, tx, mesh), mesh


def test_roundtrip_into_another_mesh_with_data_state(tmp_path):
    program, mesh = _program({"data": 2, "fsdp": 4, "tensor": 1})
    state = program.state.replace(
        step=program.state.step + 7,
        params=jax.tree.map(lambda x: x + 1.5, program.state.params),
    )
    it = toy_pipeline(16)
    next(it), next(it)
    data_state = it.get_state()
    rng = replicated_key(3, mesh)
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    ckpt.save(7, state, rng, data_state)
    ckpt.close()

    # a different mesh on resume: the target carries the new shardings
    program2, mesh2 = _program({"data": 1, "fsdp": 2, "tensor": 4})
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    assert ckpt.latest_step() == 7
    restored, key, restored_data = ckpt.restore(
        7, abstract_like(program2.state), replicated_key(0, mesh2)
    )
    ckpt.close()
    assert int(restored.step) == int(state.step)
    for a, b, target in zip(
        jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(program2.state)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == target.sharding
    assert jnp.array_equal(jax.random.key_data(key), jax.random.key_data(rng))
    assert restored_data == data_state
    it2 = toy_pipeline(16)
    it2.set_state(restored_data)
    np.testing.assert_array_equal(next(it2)["x"], next(it)["x"])  # the 3rd batch both times


def test_keeps_n_and_never_overwrites(tmp_path):
    program, mesh = _program({"data": -1, "fsdp": 1, "tensor": 1})
    rng = replicated_key(0, mesh)
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, program.state, rng, {"next_index": step})
    ckpt.wait()
    bad = program.state.replace(params=jax.tree.map(lambda x: x * jnp.nan, program.state.params))
    ckpt.save(3, bad, rng, {"next_index": 99})  # an existing step is left as it is
    ckpt.close()
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    assert ckpt.all_steps() == [2, 3]
    restored, _, data = ckpt.restore(3, abstract_like(program.state), rng)
    assert data == {"next_index": 3}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_wrong_shapes_name_the_checkpoint(tmp_path):
    program, mesh = _program({"data": -1, "fsdp": 1, "tensor": 1})
    rng = replicated_key(0, mesh)
    ckpt = TrainCheckpointer(tmp_path, keep=2)
    ckpt.save(1, program.state, rng, None)
    ckpt.wait()
    target = abstract_like(program.state)
    target = target.replace(
        params=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1,) + x.shape[1:], x.dtype), target.params
        )
    )
    with pytest.raises(CheckpointError, match="cannot restore") as err:
        ckpt.restore(1, target, rng)
    assert "\n" not in str(err.value)
    ckpt.close()
