"""train.py: a tiny stage-1 run on a generated corpus through the real entry point (subprocess),
exact resume from a checkpoint, retrieval evaluation of the run, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stage1", "--config", "configs/tiny.yaml", "stage1.bogus=1"], "unknown config key"),
        (["stage1", "--config", "configs/tiny.yaml", "train.global_batch_size=6"], "not divisible"),
        (
            [
                "stage1",
                "--config",
                "configs/tiny.yaml",
                "stage1.dataset=pop909",
                "stage1.data_dir=/nonexistent/pop909",
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
