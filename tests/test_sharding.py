"""Meshes, rules and sharded creation on 8 fake CPU devices (issue 2 item 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bossa_jax import sharding
from bossa_jax.config import load_config
from bossa_jax.errors import ConfigError
from bossa_jax.layers import MLP, Attention, LayerNorm, scan_modules, stack_modules


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = LayerNorm(16)
        self.attn = Attention(16, 4, rngs=rngs)
        self.mlp = MLP(16, 32, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm(x), is_causal=True)[0]
        return x + self.mlp(x)


def make_stack():
    return stack_modules(Block, 3, nnx.Rngs(0))


def run(stack, x):
    return jax.jit(lambda s, x: scan_modules(s, x, lambda b, c: b(c)))(stack, x)


def test_mesh_shapes():
    assert jax.device_count() == 8
    cfg = load_config(None, ["mesh.shape.fsdp=2", "mesh.shape.tensor=2"])
    mesh = sharding.make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ConfigError, match="mesh.shape"):
        sharding.make_mesh(load_config(None, ["mesh.shape.fsdp=3"]).mesh)
    with pytest.raises(ConfigError, match="mesh.shape"):
        sharding.make_mesh(load_config(None, ["mesh.shape={data: 4, fsdp: 4, tensor: 1}"]).mesh)


def test_sharded_creation_matches_rules_and_values():
    cfg = load_config(None, ["mesh.shape.fsdp=2", "mesh.shape.tensor=2"])
    mesh = sharding.make_mesh(cfg.mesh)
    x = jax.random.normal(jax.random.key(1), (4, 6, 16))
    expected = run(make_stack(), x)
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        stack = sharding.create_sharded(make_stack)
        kernel = stack.attn.q_proj.kernel[...]
        assert kernel.shape == (3, 16, 16)
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert stack.mlp.fc2.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
            None, "tensor", "fsdp"
        )
        assert stack.norm.scale[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
        xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
        got = run(stack, xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_constrain():
    cfg = load_config(None, ["mesh.shape.fsdp=2"])
    mesh = sharding.make_mesh(cfg.mesh)
    x = jnp.ones((8, 5, 16))
    assert sharding.constrain(x, "batch", None, "embed") is x  # no mesh: no-op
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        y = jax.jit(lambda x: sharding.constrain(x, "batch", None, "embed"))(x)
        # batch takes (data, fsdp); embed would reuse fsdp, so it stays replicated
        assert y.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
        z = jax.jit(lambda x: sharding.constrain(x, "batch", None, "embed"))(jnp.ones((3, 5, 16)))
        assert z.sharding.spec[0] is None  # 3 rows cannot split 8 ways
        with pytest.raises(ConfigError, match="nope"):
            sharding.logical_to_spec(("nope",))


def test_init_distributed_single_process_is_noop(monkeypatch):
    for var in (
        "BOSSA_COORDINATOR",
        "BOSSA_NUM_PROCESSES",
        "BOSSA_PROCESS_ID",
        "SLURM_JOB_ID",
        "TPU_WORKER_HOSTNAMES",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(var, raising=False)
    sharding.init_distributed()
    sharding.init_distributed(num_processes=1)
    assert jax.process_count() == 1


def test_replication_fallback_is_logged_once_by_name(caplog):
    cfg = load_config(None, ["mesh.shape.tensor=2"])
    mesh = sharding.make_mesh(cfg.mesh)

    def make():
        # 7 output rows cannot split over tensor=2: replicated, and said so naming the kernel
        return MLP(16, 7, rngs=nnx.Rngs(0))

    sharding._reported_replication.clear()  # another test in this process may have said it
    with caplog.at_level("WARNING", logger="bossa_jax.sharding"):
        with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
            model = sharding.create_sharded(make)
            sharding.create_sharded(make)  # the same parameter again: no second line
    assert model.fc1.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, None)
    lines = [r.getMessage() for r in caplog.records if "fc1.kernel" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "(16, 7)" in lines[0] and "tensor=2" in lines[0]
    # fc2's bias (16,) is on embed -> fsdp of size 1: unsharded by design, not a fallback
    assert not any("fc2.bias" in r.getMessage() for r in caplog.records)
