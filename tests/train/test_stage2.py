"""Stage-2 training (bossa_jax/train/stage2.py) on a tiny synthetic corpus in features mode: the
loss of repeated steps on one batch goes down with only the trainable set moving (MuseCoco base
frozen, LoRA leaving zero); one step on 8 devices (data=2 x fsdp=4, and the tensor-parallel preset
``configs/mesh/hosts2_gpu8_tp2.yaml``: fsdp=4 x tensor=2) equals one device, with the declared
shardings; ``train.py stage2`` killed by SIGKILL and resumed equals an uninterrupted
run."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bossa_jax import sharding
from bossa_jax.config import load_config
from bossa_jax.data.pipeline import to_global
from bossa_jax.train import stage1, stage2
from bossa_jax.train.checkpoint import TrainCheckpointer
from bossa_jax.train.step import batch_shardings, replicated_key
from tests.train.toy import flat_params

ROOT = Path(__file__).resolve().parents[2]
# CPU compile of the full step dominates: cheaper LLVM passes, same numerics (as test_stage1)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 2e-5
TOTAL = 8


def overrides(data_dir, out_dir="runs/unused", *extra) -> list[str]:
    return [
        f"data.data_dir={data_dir}",
        "data.synthetic_songs=4",
        "data.audio_input=features",
        "qformer.num_hidden_layers=2",
        "musecoco.num_hidden_layers=1",
        "stage2.train.global_batch_size=8",
        "stage2.train.compute_dtype=float32",
        "stage2.train.eval_every=0",
        f"stage2.train.total_steps={TOTAL}",
        "stage2.train.checkpoint_every=2",
        "stage2.train.log_every=2",
        "stage2.train.optim.warmup_steps=1",
        "stage2.train.optim.lr=3e-3",
        f"stage2.train.out_dir={out_dir}",
        *extra,
    ]


def tiny_config(data_dir, *extra):
    return load_config("tiny", overrides(data_dir, "runs/unused", *extra))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2_corpus")
    return stage1.write_synthetic_corpus(root, songs=4, bars=16)


@pytest.fixture(scope="module")
def local_batch(corpus):
    cfg = tiny_config(corpus)
    data = stage1.load_split(stage2.loop_config(cfg), "train")
    local = next(stage1.train_data(stage2.loop_config(cfg), data, 2)(0, 1))
    assert set(local) == {"tokens", "control_mask", "pad_mask", "audio_mask", "features"}
    assert local["tokens"].shape == (8, 1000)
    return local


def compiled_step(cfg, mesh, local):
    """(program, compiled step, global batch, rng) on ``mesh``."""
    program = stage2.build_stage2_program(cfg, mesh)
    batch = to_global(local, mesh)
    rng = replicated_key(7, mesh)
    step = program.train_step(batch_shardings(mesh, local))
    lowered = step.lower(program.state, program.frozen, batch, rng)
    step = lowered.compile(compiler_options=FAST_COMPILE)
    return program, step, batch, rng


def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): v for k, v in leaves}


def test_loss_decreases_and_only_the_trainable_set_moves(corpus, local_batch):
    cfg = tiny_config(corpus, "stage2.dropout=false")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        program, step, batch, rng = compiled_step(cfg, mesh, local_batch)
        params0 = {k: np.asarray(v) for k, v in flat(program.state.params).items()}
        frozen0 = {k: np.asarray(v) for k, v in flat(program.frozen).items()}
        state, found = program.state, []
        for _ in range(5):
            state, metrics = step(state, program.frozen, batch, rng)
            found.append(float(metrics["loss"]))
    # random frozen MuseCoco (near-uniform logits it cannot change): small but steady progress
    assert np.all(np.isfinite(found)) and np.all(np.diff(found) < 0), found
    assert found[0] - found[-1] > 1e-3, found
    assert int(metrics["supervised_tokens"]) == int(
        (~(local_batch["control_mask"] | local_batch["pad_mask"]))[:, 1:].sum()
    )
    params = flat(state.params)
    # the official set: Q-Former, audio LN, projection, LoRA; no MuseCoco base, no symbolic parts
    assert any("musecoco_proj" in k for k in params) and any("lora" in k for k in params)
    assert any("audio_layer_norm" in k for k in params) and any("qformer" in k for k in params)
    assert not any("musecoco'" in k and "lora" not in k for k in params)
    assert not any("word_embeddings" in k or "text_mlp" in k for k in params)
    lora_b = [k for k in params if "['lora']['b']" in k]
    assert lora_b and all(np.all(params0[k] == 0) for k in lora_b)
    assert all(np.any(np.asarray(params[k]) != 0) for k in lora_b)  # LoRA B leaves zero
    for k, v in flat(program.frozen).items():
        np.testing.assert_array_equal(np.asarray(v), frozen0[k], err_msg=k)
    assert any("embed_tokens" in k for k in frozen0)  # the MuseCoco base is frozen


def test_paper_trainable_set_is_lora_and_projection(corpus):
    cfg = tiny_config(corpus, "stage2.trainable=lora_projection")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        program = stage2.build_stage2_program(cfg, mesh)
    keys = flat(program.state.params)
    assert keys and all("lora" in k or "musecoco_proj" in k for k in keys), list(keys)


# 4 MuseCoco heads (q/k/v 64 wide) so that tensor=2 really splits the attention heads
SHARDED_EXTRA = ("musecoco.num_attention_heads=4",)
# the tensor-parallel preset: 2-way tensor parallel, FSDP over the rest (fsdp=4 on 8 devices)
TP_PRESET = ROOT / "configs" / "mesh" / "hosts2_gpu8_tp2.yaml"


def run_one_step(cfg, local_batch, devices):
    """(metrics, state, program) after one compiled step of ``cfg`` on ``devices``."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        program, step, batch, rng = compiled_step(cfg, mesh, local_batch)
        state, metrics = step(program.state, program.frozen, batch, rng)
    return jax.device_get(metrics), state, program


@pytest.fixture(scope="module")
def single_device_step(corpus, local_batch):
    one = "mesh.shape={data: 1, fsdp: 1, tensor: 1}"
    cfg = tiny_config(corpus, one, *SHARDED_EXTRA)
    return run_one_step(cfg, local_batch, jax.devices()[:1])


def sharded_config(corpus, mesh, tmp_path):
    if mesh == "data x fsdp":
        return tiny_config(corpus, "mesh.shape={data: 2, fsdp: 4, tensor: 1}", *SHARDED_EXTRA)
    config = tmp_path / "tp.yaml"  # the preset file itself, included as a run config would
    config.write_text(f"include: [{ROOT / 'configs' / 'tiny.yaml'}, {TP_PRESET}]\n")
    return load_config(config, overrides(corpus, "runs/unused", *SHARDED_EXTRA))


@pytest.mark.parametrize("mesh", ["data x fsdp", "tensor parallel"])
def test_sharded_step_equals_single_device(corpus, local_batch, single_device_step, mesh, tmp_path):
    cfg = sharded_config(corpus, mesh, tmp_path)
    m8, s8, program8 = run_one_step(cfg, local_batch, jax.devices()[:8])
    assert dict(program8.mesh.shape) == (
        {"data": 2, "fsdp": 4, "tensor": 1}
        if mesh == "data x fsdp"
        else {"data": 1, "fsdp": 4, "tensor": 2}
    )
    m1, s1, _ = single_device_step
    for name in ("loss", "grad_norm", "supervised_tokens"):
        np.testing.assert_allclose(m8[name], m1[name], rtol=TOL, atol=TOL, err_msg=name)
    f1, f8 = flat(s1.params), flat(s8.params)
    assert f1.keys() == f8.keys()
    worst = max(float(np.max(np.abs(np.asarray(f1[k]) - np.asarray(f8[k])))) for k in f1)
    assert worst <= TOL, worst
    # declared shardings: embed -> fsdp, qkv/mlp -> tensor (dropped where the axis has size 1);
    # MuseCoco's layers are stacked, so its specs lead with the (replicated) layers axis
    tensor = "tensor" if mesh == "tensor parallel" else None
    specs = {k: v.sharding.spec for k, v in f8.items()}
    frozen = {k: v.sharding.spec for k, v in flat(program8.frozen).items()}

    def spec(table, *parts):
        return next(v for k, v in table.items() if all(p in k for p in parts))

    assert spec(specs, "q_proj", "['lora']['a']") == P(None, "fsdp", None)
    assert spec(specs, "v_proj", "['lora']['b']") == P(None, None, tensor)
    assert spec(specs, "musecoco_proj", "kernel") == P("fsdp", None)
    assert spec(frozen, "musecoco", "q_proj", "kernel") == P(None, "fsdp", tensor)
    assert spec(frozen, "musecoco", "out_proj", "kernel") == P(None, tensor, "fsdp")
    assert spec(frozen, "musecoco", "fc1", "kernel") == P(None, "fsdp", tensor)
    # the Q-Former's attention and feed-forward too (trainable in the official set)
    assert spec(specs, "qformer", "self_attn", "q_proj", "kernel") == P("fsdp", tensor)
    assert spec(specs, "qformer", "query_mlp", "fc2", "kernel") == P(tensor, "fsdp")
    # vocab 1253 is odd: tensor=2 cannot split it, so the head is replicated along it (logged)
    assert spec(frozen, "lm_head", "kernel") == P("fsdp", None)
    # the optimizer state is sharded like the parameter it mirrors
    mu = flat(s8.opt_state)
    for parts in (("q_proj", "['lora']['a']"), ("v_proj", "['lora']['b']")):
        mu_spec = next(v for k, v in mu.items() if "mu" in k and all(p in k for p in parts))
        assert mu_spec.sharding.spec == spec(specs, *parts), parts


def _stage2_process(data_dir: Path, out_dir: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        # cheaper LLVM passes for its compile, same numerics (FAST_COMPILE)
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
    )
    argv = ["train.py", "stage2", "--config", "configs/tiny.yaml", *overrides(data_dir, out_dir)]
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_resume_after_sigkill_matches_uninterrupted_run(corpus, tmp_path):
    expected = stage2.run(load_config("tiny", overrides(corpus, tmp_path / "reference")))
    assert expected.step == TOTAL and expected.stopped_by == "done"

    out = tmp_path / "killed"
    proc = _stage2_process(corpus, out)
    ckpt_dir, t0 = out / "checkpoints", time.time()
    # a committed step is a folder named by the number alone: orbax writes commit_success.txt
    # into its "<step>.orbax-checkpoint-tmp-*" folder before renaming it into place
    while not any(
        d.name.isdigit() and (d / "commit_success.txt").exists() for d in ckpt_dir.glob("[0-9]*")
    ):
        if proc.poll() is not None:
            pytest.fail(f"stage-2 run ended before its first checkpoint:\n{proc.stdout.read()}")
        if time.time() - t0 > 600:
            proc.kill()
            pytest.fail("no checkpoint appeared")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = TrainCheckpointer(ckpt_dir, keep=3)
    killed_at = ckpt.latest_step()
    ckpt.close()
    assert killed_at is not None and killed_at < TOTAL

    resumed = stage2.run(load_config("tiny", overrides(corpus, out)), resume=True)
    assert resumed.step == TOTAL
    want, got = flat_params(expected.state.params), flat_params(resumed.state.params)
    assert want.keys() == got.keys()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-5, err_msg=key)


def test_init_from_stage1_and_musecoco_checkpoints(corpus, tmp_path):
    """``stage2.init_from`` fills the audio LN and the query branch from a stage-1 checkpoint
    (its symbolic parameters unused); ``stage2.musecoco_checkpoint`` (no adapters) fills the
    MuseCoco base and leaves LoRA at its init (B = 0)."""
    from flax import nnx

    from bossa_jax.models.arranger import Stage2Model
    from bossa_jax.models.bossa import Stage1Model, save_stage1
    from bossa_jax.models.musecoco import MuseCoco, save_musecoco
    from convert.common import param_paths

    cfg = tiny_config(corpus)
    stage1_model = Stage1Model(cfg.qformer, None, rngs=nnx.Rngs(11))
    base = MuseCoco(dataclasses.replace(cfg.musecoco, lora=False), rngs=nnx.Rngs(12))
    stage1_model.audio_layer_norm.scale[...] = 2.0  # off its init, so the copy shows
    save_stage1(tmp_path / "s1", stage1_model)
    save_musecoco(tmp_path / "mc", base)
    cfg = tiny_config(
        corpus,
        f"stage2.init_from={tmp_path / 's1'}",
        f"stage2.musecoco_checkpoint={tmp_path / 'mc'}",
    )
    model = Stage2Model(cfg.qformer, cfg.musecoco, None, rngs=nnx.Rngs(0))
    lora_a = {k: np.asarray(v[...]) for k, v in param_paths(model).items() if k.endswith("lora.a")}
    model = stage2.init_fn(cfg)(model)
    got = {k: np.asarray(v[...]) for k, v in param_paths(model).items()}
    want = {f"qformer.{k}": v for k, v in param_paths(stage1_model.qformer).items()}
    want.update({f"musecoco.{k}": v for k, v in param_paths(base).items()})
    want["audio_layer_norm.scale"] = stage1_model.audio_layer_norm.scale
    written = 0
    for key, value in got.items():
        if key in want:
            np.testing.assert_array_equal(value, np.asarray(want[key][...]), err_msg=key)
            written += 1
        elif key.endswith("lora.b"):
            assert not value.any(), key
        elif key.endswith("lora.a"):
            np.testing.assert_array_equal(value, lora_a[key], err_msg=key)
        else:
            assert key.startswith(("musecoco_proj", "audio_layer_norm.bias")), key
    assert written > 20
