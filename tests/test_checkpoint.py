"""Converted-model checkpoints (bossa_jax.checkpoint): sharded restores and bounded write memory
(issue 9 item 4)."""

import jax
import numpy as np
from flax import nnx

from bossa_jax import checkpoint, sharding
from bossa_jax.config import load_config
from bossa_jax.layers import MLP


def make_mlp():
    return MLP(16, 64, rngs=nnx.Rngs(0))


def test_restore_goes_straight_into_the_target_shardings(tmp_path):
    """With a mesh, each parameter comes back as its NamedSharding (spread over the devices),
    not as a whole array on one device; the values are those saved."""
    saved = make_mlp()
    checkpoint.save_module(tmp_path / "ckpt", saved, {})
    cfg = load_config(None, ["mesh.shape.fsdp=2", "mesh.shape.tensor=2"])
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        restored = checkpoint.load_module(tmp_path / "ckpt", make_mlp, mesh=mesh)
        wanted = sharding.named_shardings(nnx.state(restored, nnx.Param), mesh)
    params = nnx.to_flat_state(nnx.state(restored, nnx.Param))
    wanted = dict(nnx.to_flat_state(wanted))
    before = dict(nnx.to_flat_state(nnx.state(saved, nnx.Param)))
    spread = 0
    for path, var in params:
        array = var.get_value()
        assert array.sharding == wanted[path].get_value(), path
        spread += len(array.sharding.device_set) > 1 and not array.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(array), np.asarray(before[path].get_value()))
    assert spread > 0  # the MLP kernels are split over fsdp x tensor
    assert jax.device_count() == 8


def test_save_writes_small_data_files(tmp_path, monkeypatch):
    """orbax's OCDBT store holds written chunks in memory up to its data-file size; save_module
    bounds that size, so a model larger than it is written as several files (the conversion
    peak memory of issue 9 stays near one copy of the model)."""
    monkeypatch.setattr(checkpoint, "DATA_FILE_BYTES", 1 << 12)
    checkpoint.save_module(tmp_path / "ckpt", make_mlp(), {})
    files = [f for f in (tmp_path / "ckpt" / "params").rglob("d/*") if f.is_file()]
    assert len(files) > 1 and max(f.stat().st_size for f in files) < 3 * (1 << 12)
    restored = checkpoint.load_module(tmp_path / "ckpt", make_mlp)
    assert restored.fc1.kernel.shape == (16, 64)
