"""The generic train step: trainable filter, shardings on 8 fake CPU devices, 1-vs-8-device
equality, bf16 compute with fp32 master weights (DESIGN "Flax and JAX idioms")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bossa_jax.config import MeshConfig, OptimConfig
from bossa_jax.sharding import create_sharded, make_mesh, use_mesh
from bossa_jax.train.optim import make_optimizer
from bossa_jax.train.step import (
    batch_shardings,
    build_program,
    cast_floating,
    compile_ahead,
    replicated_key,
    trainable_filter,
)
from tests.train.toy import FROZEN, make_model, toy_loss, toy_pipeline

SHAPE_8 = {"data": 2, "fsdp": 2, "tensor": 2}


def one_step(devices, shape, compute_dtype=jnp.float32):
    mesh_cfg = MeshConfig(shape=shape)
    mesh = make_mesh(mesh_cfg, devices)
    with use_mesh(mesh, mesh_cfg.rules):
        model = create_sharded(make_model)
        tx = make_optimizer(OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2), 10)
        program = build_program(
            model, trainable_filter(*FROZEN), toy_loss, tx, mesh, compute_dtype=compute_dtype
        )
        local = next(toy_pipeline(16))
        shardings = batch_shardings(mesh, local)
        batch = jax.tree.map(jax.device_put, local, shardings)
        rng = replicated_key(0, mesh)
        before = jax.tree.map(np.asarray, program.state.params)
        step = compile_ahead(
            program.train_step(shardings), program.state, program.frozen, batch, rng
        )
        state, metrics = step(program.state, program.frozen, batch, rng)
    return program, before, state, metrics


@pytest.fixture(scope="module")
def runs():
    return one_step(jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1}), one_step(
        jax.devices(), SHAPE_8
    )


def test_filter_keeps_frozen_encoder_out_of_the_optimizer(runs):
    (program, before, state, _), _ = runs
    assert set(state.params.keys()) == {"head", "mlp", "norm"}
    assert "encoder" in program.frozen
    changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), before, state.params)
    assert all(jax.tree.leaves(changed))
    assert int(state.step) == 1 and int(state.opt_state[0].count) == 1


def test_sharded_step_equals_single_device(runs):
    (_, _, s1, m1), (_, _, s8, m8) = runs
    assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_params_and_optimizer_state_shardings_follow_the_rules(runs):
    _, (program, _, state, _) = runs
    # rules: embed -> fsdp, mlp -> tensor (MeshConfig defaults)
    expected = {
        ("mlp", "fc1", "kernel"): P("fsdp", "tensor"),
        ("mlp", "fc1", "bias"): P("tensor"),
        ("mlp", "fc2", "kernel"): P("tensor", "fsdp"),
        ("norm", "scale"): P("fsdp"),
        ("head", "kernel"): P("fsdp", None),
    }
    adam = state.opt_state[0]
    for path, spec in expected.items():
        node, mu, nu = state.params, adam.mu, adam.nu
        for key in path:
            node, mu, nu = node[key], mu[key], nu[key]
        for arr in (node, mu, nu):
            assert arr[...].sharding.spec == spec, path
    assert program.frozen["encoder"]["kernel"][...].sharding.spec == P(None, "fsdp")
    assert adam.count.sharding.spec == P()


def test_bf16_compute_keeps_fp32_master_weights_and_state():
    program, _, state, metrics = one_step(
        jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1}, compute_dtype=jnp.bfloat16
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert np.isfinite(float(metrics["loss"])) and metrics["loss"].dtype == jnp.float32
    del program


def test_frozen_params_get_no_gradient():
    model = make_model()
    graphdef, params, frozen = nnx.split(model, trainable_filter(*FROZEN), ...)
    batch = {k: jnp.asarray(v) for k, v in next(toy_pipeline(8)).items()}

    def loss_of_everything(p, f):
        return toy_loss(nnx.merge(graphdef, p, f), batch, None)[0]

    _, g_frozen = jax.jit(jax.grad(loss_of_everything, argnums=(0, 1)))(params, frozen)
    # the frozen encoder does influence the loss, so only the split keeps it out of training
    assert float(jnp.abs(g_frozen["encoder"]["kernel"][...]).max()) > 0


def test_bf16_cast_keeps_the_temperature_exactly_fp32():
    """Under bf16 compute the step's cast leaves scalars alone: the stage-1 temperature the model
    sees is float32 0.07, not bf16's 0.06982 (issue 8 item 4a); weight matrices are bf16."""
    from bossa_jax.config import load_config
    from bossa_jax.models.bossa import TRAINABLE, Stage1Model

    cfg = load_config("tiny", ["train.compute_dtype=bfloat16"])
    model = Stage1Model(cfg.qformer, None, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)

    @jax.jit
    def seen(params, frozen):
        m = nnx.merge(
            graphdef, cast_floating(params, jnp.bfloat16), cast_floating(frozen, jnp.bfloat16)
        )
        return m.temp[...], m.audio_proj.kernel[...]

    temp, kernel = seen(params, frozen)
    assert temp.dtype == jnp.float32 and temp == np.float32(0.07)
    assert kernel.dtype == jnp.bfloat16
