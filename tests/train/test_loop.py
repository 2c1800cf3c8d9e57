"""The training loop on the toy task: outputs, exact resume after SIGKILL, SIGTERM -> checkpoint
and exit 0, non-finite loss, a mesh that does not divide the batch, and re-runs into a run folder
(refused without --resume / --overwrite; --overwrite keeps user files; --resume falls back past a
damaged checkpoint)."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bossa_jax.errors import BossaError, ConfigError
from bossa_jax.train.checkpoint import TrainCheckpointer
from bossa_jax.train.step import abstract_like, trainable_filter
from tests.train.run_files import damage_checkpoint, snapshot
from tests.train.toy import (
    FROZEN,
    flat_params,
    make_model,
    run_toy,
    toy_arrays,
    toy_config,
    toy_eval_loss,
)

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run (8 devices, this process)."""
    out = tmp_path_factory.mktemp("reference")
    result = run_toy(
        toy_config(str(out), ["train.eval_every=6"]),
        eval_data=_eval_batches,
        eval_loss_fn=toy_eval_loss,
    )
    return out, result, flat_params(result.state.params)


def _eval_batches(process_index, process_count):
    arrays = toy_arrays(seed=1)
    return [{k: v[i : i + 32] for k, v in arrays.items()} for i in (0, 32)]


def _toy_process(out_dir: Path, *args: str) -> subprocess.Popen:
    # 2 devices (fewer compiles than 8); the resume then runs on this process's 8: a new mesh
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train.toy", str(out_dir), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"toy run ended early:\n{proc.stdout.read()}")
        # only a renamed "<step>" folder is committed: orbax writes commit_success.txt into its
        # "<step>.orbax-checkpoint-tmp-*" folder first
        if any(
            d.name.isdigit() and (d / "commit_success.txt").exists()
            for d in ckpt_dir.glob("[0-9]*")
        ):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def test_run_writes_config_metrics_tensorboard_and_checkpoints(reference):
    out, result, _ = reference
    assert result.stopped_by == "done" and result.exit_code == 0 and result.step == TOTAL
    assert "train:\n" in (out / "config.yaml").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(2, TOTAL + 1, 2))
    for key in ("loss", "mae", "grad_norm", "lr", "steps_per_s", "samples_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert [r["step"] for r in evals] == [6, 12]
    # the last eval equals the eval loss of the final parameters, computed here directly
    graphdef, _, frozen = nnx.split(make_model(), trainable_filter(*FROZEN), ...)
    model = nnx.merge(graphdef, jax.device_get(result.state.params), frozen)
    losses = [float(toy_eval_loss(model, b, None)[0]) for b in _eval_batches(0, 1)]
    assert evals[-1]["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert records[-1]["lr"] == pytest.approx(0.001 + 0.009 * (1 + np.cos(np.pi * 7 / 8)) / 2)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    ckpt = TrainCheckpointer(out / "checkpoints", keep=3)
    assert ckpt.all_steps() == [6, 9, 12]
    ckpt.close()


def test_resume_after_sigkill_matches_uninterrupted_run(reference, tmp_path):
    _, _, expected = reference
    proc = _toy_process(tmp_path, "--sleep", "0.3")
    _wait_for_checkpoint(proc, tmp_path / "checkpoints")
    time.sleep(random.uniform(0.0, 1.0))  # a random point after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = TrainCheckpointer(tmp_path / "checkpoints", keep=3)
    killed_at = ckpt.latest_step()
    ckpt.close()
    assert killed_at is not None and killed_at < TOTAL

    result = run_toy(toy_config(str(tmp_path)), resume=True)
    assert result.step == TOTAL
    got = flat_params(result.state.params)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)
    # the resumed run appended to the same metrics log
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == TOTAL


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    proc = _toy_process(tmp_path, "--sleep", "0.3", "train.checkpoint_every=5")
    _wait_for_checkpoint(proc, tmp_path / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped = [line for line in output.splitlines() if line.startswith("toy: stopped_by=")]
    assert stopped and stopped[0].startswith("toy: stopped_by=SIGTERM"), output
    step = int(stopped[0].rsplit("=", 1)[1])
    assert 5 <= step < TOTAL
    ckpt = TrainCheckpointer(tmp_path / "checkpoints", keep=3)
    assert ckpt.latest_step() == step  # the step it stopped at, not only the periodic one
    ckpt.close()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(reference, tmp_path):
    _, ref_result, _ = reference
    with pytest.raises(BossaError, match="non-finite loss") as err:
        run_toy(toy_config(str(tmp_path)), nan_at=7)  # the 8th update sees NaN inputs
    message = str(err.value)
    assert "\n" not in message and "at step 8" in message and "step 6" in message
    ckpt = TrainCheckpointer(tmp_path / "checkpoints", keep=3)
    assert ckpt.all_steps() == [3, 6]
    state, _, _ = ckpt.restore(6, abstract_like(ref_result.state), jax.random.key(0))
    ckpt.close()
    assert int(state.step) == 6
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_mesh_that_does_not_divide_the_batch_names_the_key(tmp_path):
    cfg = toy_config(str(tmp_path), ["train.global_batch_size=12"])  # 8 batch shards
    with pytest.raises(ConfigError) as err:
        run_toy(cfg)
    message = str(err.value)
    assert "train.global_batch_size" in message and "\n" not in message


# --- re-runs: --resume / --overwrite (issue 7 item 2) -------------------------------------------


def _copy_run(reference, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(reference, tmp_path):
    out = _copy_run(reference, tmp_path)
    before = snapshot(out)
    with pytest.raises(BossaError) as err:
        run_toy(toy_config(str(out)))
    message = str(err.value)
    assert "\n" not in message and str(out) in message
    assert "--resume" in message and "--overwrite" in message
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_and_keeps_user_files(reference, tmp_path):
    out = _copy_run(reference, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.txt").write_text("mine too")
    old_events = set((out / "tb").iterdir())
    cfg = toy_config(str(out), ["train.total_steps=6", "train.checkpoint_every=3"])
    result = run_toy(cfg, overwrite=True)
    assert result.step == 6
    ckpt = TrainCheckpointer(out / "checkpoints", keep=3)
    assert ckpt.all_steps() == [3, 6]  # the old run's 6, 9 and 12 are gone, not kept
    ckpt.close()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert not old_events & set((out / "tb").iterdir())
    assert "total_steps: 6" in (out / "config.yaml").read_text()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "analysis" / "plot.txt").read_text() == "mine too"


def test_resume_without_a_checkpoint_says_it_starts_at_zero(tmp_path, caplog):
    cfg = toy_config(str(tmp_path), ["train.total_steps=2", "train.optim.warmup_steps=1"])
    with caplog.at_level(logging.WARNING, logger="bossa_jax.train"):
        result = run_toy(cfg, resume=True)
    assert result.step == 2
    lines = [r.getMessage() for r in caplog.records if "starting from step 0" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_resume_falls_back_past_a_damaged_checkpoint(reference, tmp_path, caplog):
    _, _, expected = reference
    out = _copy_run(reference, tmp_path)
    damage_checkpoint(out / "checkpoints" / "12")
    with caplog.at_level(logging.WARNING, logger="bossa_jax.train"):
        result = run_toy(toy_config(str(out)), resume=True)
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and "step 12" in damaged[0]
    assert (out / "damaged-checkpoints" / "12").is_dir()  # set aside, not deleted
    assert result.step == TOTAL  # resumed from step 9: the same weights as the uninterrupted run
    got = flat_params(result.state.params)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)
    ckpt = TrainCheckpointer(out / "checkpoints", keep=3)
    assert ckpt.all_steps() == [6, 9, 12]
    ckpt.restore(12, abstract_like(result.state), jax.random.key(0))  # rewritten, intact
    ckpt.close()


def test_resume_with_every_checkpoint_damaged_is_one_line(reference, tmp_path):
    out = _copy_run(reference, tmp_path)
    for step in (6, 9, 12):
        damage_checkpoint(out / "checkpoints" / str(step))
    with pytest.raises(BossaError) as err:
        run_toy(toy_config(str(out)), resume=True)
    message = str(err.value)
    assert "\n" not in message and "restores" in message and "--overwrite" in message
    assert not (out / "damaged-checkpoints").exists()  # nothing known good to compare with: kept
