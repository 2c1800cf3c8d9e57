"""errors.run_cli: Ctrl-C anywhere exits 130 without a crash or a partial output (issue 7 item 3),
and orbax's late read callbacks after a failed restore stay off stderr (issue 7 item 6).

The Ctrl-C tests send SIGINT to the child's process group (what a terminal does), 10 children per
scenario, at delays spread over the phase under test: the features command from start to finish,
``train.py stage1`` while it builds the model, and the training loop (the toy task through the same
loop and run_cli) mid-step and while an async checkpoint is being written. A child that had not
reached the phase yet still has to exit 130 cleanly. Before the fix the features command died with
a segfault (exit -11) after ``interrupted`` and a Ctrl-C that landed in a gc callback was lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bossa_jax import errors
from bossa_jax.outputs import MARKER

ROOT = Path(__file__).resolve().parent.parent
CHILDREN = 10
FEATURE_FILES = ("codes.npy", "features.npy", "masks.npy", "files.txt")
CRASH_MARKERS = ("Traceback", "Fatal Python error", "Segmentation fault", "Event loop is closed")


def _env(tmp: Path, devices: int = 1) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true",
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
    )


def _start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own process group, as a shell's job control gives it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _interrupt(proc: subprocess.Popen) -> str:
    """Ctrl-C to the child's process group; returns its output once it has exited."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:  # already finished
        pass
    output, _ = proc.communicate(timeout=300)
    return output


def _assert_clean_interrupt(proc: subprocess.Popen, output: str, what: str) -> None:
    assert proc.returncode == 130, f"{what}: exit {proc.returncode}\n{output[-3000:]}"
    assert not [m for m in CRASH_MARKERS if m in output], f"{what}:\n{output[-3000:]}"
    assert output.rstrip().endswith("interrupted") or "stopped_by=SIGINT" in output, output[-2000:]


def _leftovers(folder: Path) -> list[str]:
    """Temporary outputs: atomic_output's hidden siblings and orbax's unfinished step folders
    (the children's shared JAX compilation cache is not an output, nor the marker a finished
    output folder carries)."""
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if (p.name.startswith(".") or "tmp" in p.name)
        and "jax_cache" not in p.parts
        and p.name != MARKER
    ]


def _wait_for(proc: subprocess.Popen, text: str, lines: list[str]) -> bool:
    """Reads the child's output until a line holds ``text`` (tqdm shares the line); False if the
    child ended first."""
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return True
    return False


class _RaisesWhenCollected:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def __del__(self):
        raise self.exc


def test_late_event_loop_callbacks_and_swallowed_ctrl_c_stay_quiet(monkeypatch, capsys):
    monkeypatch.setattr(sys, "unraisablehook", errors._quiet_unraisable)
    monkeypatch.setattr(errors, "_next_unraisablehook", sys.__unraisablehook__)
    # each is collected at once: an exception Python cannot raise, handed to the hook
    _RaisesWhenCollected(RuntimeError("Event loop is closed"))
    _RaisesWhenCollected(KeyboardInterrupt())
    assert capsys.readouterr().err == ""
    _RaisesWhenCollected(RuntimeError("something else"))
    assert "RuntimeError: something else" in capsys.readouterr().err


@pytest.mark.stress
def test_ctrl_c_during_the_features_command(tmp_path):
    wav = tmp_path / "tone.wav"
    t = np.arange(3 * 32000) / 32000
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 32000)
    rng = random.Random(0)
    for i in range(CHILDREN):
        out = tmp_path / f"feats{i}"
        tiny = str(ROOT / "configs/tiny.yaml")
        cmd = [sys.executable, "-m", "bossa_jax.features", str(wav), "--random-init", "0",
               "--config", tiny, "--out", str(out), "--no-progress"]  # fmt: skip
        proc = _start(cmd, _env(tmp_path), tmp_path)
        time.sleep(1.0 + 7.0 * i / CHILDREN + rng.uniform(0, 0.5))  # imports ... compute
        output = _interrupt(proc)
        if proc.returncode == 0:  # finished before the signal: a complete output, nothing to check
            continue
        _assert_clean_interrupt(proc, output, f"features child {i}")
        if out.exists():  # the signal came after the rename into place: a complete output
            # (with the marker every output folder carries, bossa_jax.outputs)
            assert sorted(p.name for p in out.iterdir()) == sorted((*FEATURE_FILES, MARKER)), i
            assert np.load(out / "features.npy").shape[0] == 1
        assert not _leftovers(tmp_path), _leftovers(tmp_path)


@pytest.mark.stress
def test_ctrl_c_while_stage1_builds_the_model(tmp_path):
    from bossa_jax.train.stage1 import write_synthetic_corpus

    corpus = write_synthetic_corpus(tmp_path / "corpus", songs=5, bars=16)
    rng = random.Random(1)
    interrupted = 0
    for i in range(CHILDREN):
        out = tmp_path / f"run{i}"
        cmd = [sys.executable, str(ROOT / "train.py"), "stage1", "--config",
               str(ROOT / "configs/tiny.yaml"), f"data.data_dir={corpus}",
               f"train.out_dir={out}", "train.global_batch_size=4", "train.eval_every=0",
               "qformer.num_hidden_layers=2", "musicgen.keep_layers=1"]  # fmt: skip
        proc = _start(cmd, _env(tmp_path), tmp_path)
        time.sleep(1.0 + 8.0 * i / CHILDREN + rng.uniform(0, 0.5))  # imports, data, build
        output = _interrupt(proc)
        if proc.returncode == 0:  # a fast machine finished the whole tiny run before the signal
            assert "stopped_by=done" in output, output[-2000:]
            assert not [m for m in CRASH_MARKERS if m in output], output[-3000:]
        else:
            _assert_clean_interrupt(proc, output, f"stage1 child {i}")
            interrupted += 1
        assert not _leftovers(tmp_path), _leftovers(tmp_path)
        steps = sorted((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else []
        assert all((p / "commit_success.txt").is_file() for p in steps), steps
    assert interrupted >= CHILDREN // 2, f"only {interrupted} of {CHILDREN} runs were interrupted"


def _toy(out: Path, tmp: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.train.toy", str(out), *args]
    # every compile of the toy run is short: cache them all, so only the first of the children
    # (which are signalled after a given step's output line, not after a delay) compiles
    env = dict(_env(tmp, devices=2), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return _start(cmd, env, ROOT)


def _check_toy_run(out: Path, output: str) -> int:
    """The run stopped on SIGINT with a committed checkpoint of the step it stopped at."""
    stopped = [line for line in output.splitlines() if line.startswith("toy: stopped_by=")]
    assert stopped and stopped[0].startswith("toy: stopped_by=SIGINT"), output[-2000:]
    step = int(stopped[0].rsplit("=", 1)[1])
    committed = sorted(int(p.name) for p in (out / "checkpoints").iterdir())  # digits only
    assert committed and committed[-1] == step, (committed, step)
    assert all((out / "checkpoints" / str(s) / "commit_success.txt").is_file() for s in committed)
    assert not _leftovers(out), _leftovers(out)
    return step


def _restores(out: Path, step: int) -> None:
    from bossa_jax.train.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(out / "checkpoints", keep=3)
    try:
        import orbax.checkpoint as ocp

        restored = ckpt.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()),
        )
        assert int(np.asarray(restored["state"]["train"]["step"])) == step
    finally:
        ckpt.close()


@pytest.mark.stress
@pytest.mark.parametrize("phase", ["mid-step", "mid-checkpoint"])
def test_ctrl_c_during_training(tmp_path, phase):
    rng = random.Random(2)
    out = None
    step = 0
    for i in range(CHILDREN):
        out = tmp_path / f"toy{i}"
        if phase == "mid-step":  # a slow step: the signal lands inside it
            proc = _toy(out, tmp_path, "--sleep", "0.3", "train.checkpoint_every=4")
            target = f"toy: step {1 + i % 3} done"
        else:  # a checkpoint every step: the signal lands while the last one's async write runs
            proc = _toy(out, tmp_path, "--sleep", "0.05", "train.checkpoint_every=1")
            target = f"toy: step {2 + i % 4} done"
        lines: list[str] = []
        reached = _wait_for(proc, target, lines)
        if phase == "mid-step":
            time.sleep(rng.uniform(0.0, 0.3))
        output = "".join(lines) + _interrupt(proc)
        if not reached:
            pytest.fail(f"toy child {i} ended before {target!r}:\n{output[-2000:]}")
        _assert_clean_interrupt(proc, output, f"toy child {i} ({phase})")
        step = _check_toy_run(out, output)
    _restores(out, step)  # the last child's final checkpoint is intact
