"""Stage-1 and stage-2 initialisation restore their checkpoints straight into the sharded model
(issue 9 item 4): on 8 devices (fsdp=4 x tensor=2) every checkpoint goes through
``checkpoint.load_module`` with the training mesh, so each parameter arrives as its declared
NamedSharding (each device reads only its shards, no whole parameter on one device), and the
initialised model equals the single-device load of the same checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from bossa_jax import checkpoint, sharding
from bossa_jax.config import load_config
from bossa_jax.models.bossa import Stage1Model, load_stage1, save_stage1
from bossa_jax.models.musecoco import MuseCoco, load_musecoco, save_musecoco
from bossa_jax.train import stage1, stage2
from convert.common import param_paths

MESH = "mesh.shape={data: 1, fsdp: 4, tensor: 2}"
BASE = (
    "data.audio_input=features",
    "qformer.num_hidden_layers=2",
    "musecoco.num_hidden_layers=1",
    "musecoco.num_attention_heads=4",  # q/k/v 64 wide: tensor=2 splits them
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(stage-1 checkpoint, converted MuseCoco checkpoint) of random tiny models."""
    root = tmp_path_factory.mktemp("sharded_init")
    cfg = load_config("tiny", list(BASE))
    model = Stage1Model(cfg.qformer, None, rngs=nnx.Rngs(11))
    model.audio_layer_norm.scale[...] = 2.0  # off its init, so the copy shows
    save_stage1(root / "s1", model)
    base = MuseCoco(dataclasses.replace(cfg.musecoco, lora=False), rngs=nnx.Rngs(12))
    save_musecoco(root / "mc", base)
    return root / "s1", root / "mc"


@pytest.fixture
def restores(monkeypatch):
    """Every ``checkpoint.load_module`` call: (path, mesh, the restored module)."""
    calls = []
    real = checkpoint.load_module

    def spy(path, ctor, *, mesh=None):
        module = real(path, ctor, mesh=mesh)
        calls.append((str(path), mesh, module))
        return module

    monkeypatch.setattr(checkpoint, "load_module", spy)
    return calls


def _values(module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in param_paths(module).items()}


def _check_restored_sharded(calls, mesh, expected_paths) -> None:
    """Each checkpoint was restored with the mesh, every parameter as its declared sharding."""
    assert sorted(path for path, _, _ in calls) == sorted(map(str, expected_paths))
    for path, used_mesh, module in calls:
        assert used_mesh == mesh, path
        params = nnx.state(module, nnx.Param)
        with sharding.use_mesh(mesh, sharding.rules_of(load_config("tiny").mesh)):
            declared = sharding.named_shardings(params, mesh)
        flat_declared = dict(nnx.to_flat_state(declared))
        split = 0
        for key, var in nnx.to_flat_state(params):
            got = var.get_value().sharding
            assert isinstance(got, NamedSharding) and got.mesh == mesh, (path, key)
            assert got.spec == flat_declared[key].get_value().spec, (path, key, got.spec)
            split += any(axis is not None for axis in got.spec)
        assert split > 0, path  # something really is split across devices


def _check_model(model, mesh, want: dict[str, np.ndarray]) -> None:
    """The model's parameters keep their declared shardings and hold ``want`` where given."""
    with sharding.use_mesh(mesh, sharding.rules_of(load_config("tiny").mesh)):
        declared = {
            ".".join(map(str, k)): v.get_value().spec
            for k, v in nnx.to_flat_state(
                sharding.named_shardings(nnx.state(model, nnx.Param), mesh)
            )
        }
    got = param_paths(model)
    for key, var in got.items():
        assert var.get_value().sharding.spec == declared[key], key
    written = 0
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key][...]), value, err_msg=key)
        written += 1
    assert written > 20


def test_stage2_init_restores_into_the_sharded_model(checkpoints, restores):
    s1, mc = checkpoints
    cfg = load_config(
        "tiny", [*BASE, MESH, f"stage2.init_from={s1}", f"stage2.musecoco_checkpoint={mc}"]
    )
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        model = stage2.build_model(cfg)
    _check_restored_sharded(restores, mesh, [s1, mc])
    # the single-device loads of the same checkpoints (no mesh)
    source, base = load_stage1(s1), load_musecoco(mc)
    want = {f"qformer.{k}": v for k, v in _values(source.qformer).items()}
    want = {k: v for k, v in want.items() if k in param_paths(model)}  # query branch only
    want.update({f"musecoco.{k}": v for k, v in _values(base).items()})
    want["audio_layer_norm.scale"] = np.asarray(source.audio_layer_norm.scale[...])
    _check_model(model, mesh, want)


def test_stage1_init_restores_into_the_sharded_model(checkpoints, restores):
    s1, _ = checkpoints
    cfg = load_config("tiny", [*BASE, MESH, f"stage1.init_from={s1}"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        model = stage1.build_model(cfg)
    _check_restored_sharded(restores, mesh, [s1])
    _check_model(model, mesh, _values(load_stage1(s1)))
