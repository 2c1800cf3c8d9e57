"""train.py: a tiny stage-1 run on a generated corpus through the real entry point (subprocess),
exact resume from a checkpoint, retrieval evaluation and export of the run, a re-run refused
without --resume / --overwrite, damaged checkpoints as one stderr line, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.run_files import damage_checkpoint, snapshot

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("bar", "pos", "inst", "pitch", "dur", "vel", "ts", "tempo")
LOSS_TERMS = ("loss", "itc", "itm", "itg", *(f"itg_{f}" for f in FIELDS))
TRAIN_KEYS = {*LOSS_TERMS, "temp", "lr", "grad_norm", "steps_per_s", "samples_per_s"}
RUN = (
    "train.total_steps=4",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "train.eval_every=4",
    "train.global_batch_size=4",
    "train.optim.warmup_steps=2",
    "qformer.num_hidden_layers=2",
    "musicgen.keep_layers=1",
)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        # one device; cheaper LLVM passes (compile time dominates a tiny run on CPU)
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=1 "
        "--xla_llvm_disable_expensive_passes=true",
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),  # the resumed run reuses the compile
        PYTHONPATH=str(ROOT),
    )
    return env


def _train(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    args = ("stage1", "--config", str(ROOT / "configs/tiny.yaml"), "--synthetic", "5")
    first = _train(tmp, *args, f"train.out_dir={out}", *RUN)
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp, out, args, first


def test_stage1_run_logs_every_term_and_checkpoints(run):
    _, out, _, first = run
    assert "stopped_by=done step=4" in first.stdout
    records = _records(out)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert all(isinstance(r[k], float) for k in TRAIN_KEYS)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4] and set(LOSS_TERMS) <= set(evals[0])
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [
        2,
        4,
    ]
    assert (out / "config.yaml").is_file() and list((out / "tb").iterdir())
    assert (out / "synthetic-data" / "split.json").is_file()


def test_resume_continues_exactly(run):
    tmp, out, args, _ = run
    before = _records(out)
    shutil.rmtree(out / "checkpoints" / "4")  # as if the run died after step 2's checkpoint
    again = _train(tmp, *args, f"train.out_dir={out}", *RUN, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped_by=done step=4" in again.stdout
    after = _records(out)[len(before) :]
    assert [(r["split"], r["step"]) for r in after] == [("train", 4), ("eval", 4)]
    first_step4 = next(r for r in before if r["split"] == "train" and r["step"] == 4)
    for key in LOSS_TERMS:
        assert after[0][key] == pytest.approx(first_step4[key], rel=1e-6, abs=1e-6), key


def test_eval_retrieval_on_the_run(run):
    tmp, out, _, _ = run
    report_path = tmp / "retrieval.json"
    result = _train(
        tmp, "eval-retrieval", "--config", str(out / "config.yaml"), "--checkpoint", str(out),
        "--pairs", "4", "--rounds", "2", "--out", str(report_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["pairs"] == 4 and report["rounds"] == 2 and report["split"] == "test"
    for name in ("acc@1", "acc@5", "mean_rank"):
        assert set(report["summary"][name]) == {"mean", "stderr"}
    assert 1.0 <= report["summary"]["mean_rank"]["mean"] <= 4.0


LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING) [\w.]+: ")


def _only_error_line(result: subprocess.CompletedProcess) -> str:
    """The one stderr line besides log records; no traceback anywhere."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip() and not LOG_LINE.match(x)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_rerun_into_the_finished_run_is_refused(run):
    tmp, out, args, _ = run
    before = snapshot(out / "checkpoints"), (out / "metrics.jsonl").read_bytes()
    config = (out / "config.yaml").read_bytes()
    again = _train(tmp, *args, f"train.out_dir={out}", *RUN, "train.optim.lr=0.001")
    line = _only_error_line(again)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert (snapshot(out / "checkpoints"), (out / "metrics.jsonl").read_bytes()) == before
    assert (out / "config.yaml").read_bytes() == config


def test_damaged_checkpoints_are_one_line(run):
    tmp, out, args, _ = run
    damaged = tmp / "damaged"
    shutil.copytree(out / "checkpoints", damaged / "checkpoints")
    for step_dir in (damaged / "checkpoints").iterdir():
        damage_checkpoint(step_dir)
    result = _train(
        tmp, "eval-retrieval", "--config", str(out / "config.yaml"), "--checkpoint", str(damaged),
        "--pairs", "4", "--rounds", "1", "--out", str(tmp / "damaged.json"),
    )  # fmt: skip
    assert "cannot restore" in _only_error_line(result)
    assert not (tmp / "damaged.json").exists()
    shutil.copytree(out / "synthetic-data", damaged / "synthetic-data")
    resumed = _train(tmp, *args, f"train.out_dir={damaged}", *RUN, "--resume")
    assert "no checkpoint in" in _only_error_line(resumed)


def test_export_of_the_run(run):
    tmp, out, _, _ = run
    result = _train(tmp, "export", str(out), str(tmp / "exported"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"out": str(tmp / "exported")}
    assert "name: bossa_stage1" in (tmp / "exported" / "config.yaml").read_text()
    again = _train(tmp, "export", str(out), str(tmp / "exported"))
    assert "pass --overwrite" in _only_error_line(again)
    replaced = _train(tmp, "export", str(out), str(tmp / "exported"), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]


# --- bad inputs: one line on stderr, non-zero exit (in-process, no compile) -------------------
@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error_line(cli, capsys, argv) -> str:
    from bossa_jax.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli.main, argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


NO_RUN = "train.out_dir=/nonexistent/run"  # not a run folder a developer may have in the checkout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stage1", "--config", "configs/tiny.yaml", "stage1.bogus=1"], "unknown config key"),
        (
            ["stage1", "--config", "configs/tiny.yaml", "--resume", "--overwrite"],
            "exclude each other",
        ),
        (
            ["stage1", "--config", "configs/tiny.yaml", "data.random_musicgen=false", NO_RUN],
            "data.musicgen_checkpoint",
        ),
        (["stage1", "--config", "configs/tiny.yaml", "train.global_batch_size=6"], "not divisible"),
        (
            [
                "stage1",
                "--config",
                "configs/tiny.yaml",
                "data.dataset=pop909",
                "data.data_dir=/nonexistent/pop909",
                NO_RUN,
            ],
            "/nonexistent/pop909 not found",
        ),  # fmt: skip
        (["stage1", "--config", "configs/missing.yaml"], "config file not found"),
        (["stage2"], "--config"),
        (
            ["stage2", "--config", "configs/tiny.yaml", "stage2.train.global_batch_size=6"],
            "'stage2.train.global_batch_size': 6 is not divisible",
        ),
        ([], "give a command"),
        (["stage1"], "--config"),
    ],
)
def test_bad_input_is_one_line(cli, capsys, argv, message):
    line = _error_line(cli, capsys, argv)
    assert line.startswith("error: ") and message in line, line
