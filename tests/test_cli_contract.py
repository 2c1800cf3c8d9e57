"""The command-line contract of every command in the README (issue 7): a table of bad inputs
(missing and corrupt files, bad configs and overrides, impossible or unsafe output paths) fed to
features, data.codes, symbolic, each converter, train.py and generate.py. Each row must end with a
non-zero exit (2: the user's mistake), exactly one stderr line beginning ``error:`` that names
what is wrong, no traceback, and nothing new, changed or missing on disk.

Rows run in-process through ``errors.run_cli`` and the command's ``main`` (what ``python -m``
runs); the few where process behaviour matters (a closed stdout pipe, library logging) run as
subprocesses. Then: user files next to and inside every kind of output survive the commands that
write them (on the code before issue 7 they were deleted), and ``--overwrite`` replaces only a
previous output of the same kind.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from flax import nnx

from bossa_jax import checkpoint
from bossa_jax.config import EncodecConfig
from bossa_jax.data import synthetic
from bossa_jax.errors import run_cli
from bossa_jax.models.encodec import EncodecEncoder, config_section
from tests.test_features import random_module

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
SR = 32000
LEADSHEET = str(ROOT / "bossa_jax" / "assets" / "demo_leadsheet.mid")
ENCODEC_CFG = EncodecConfig(num_filters=4, hidden_size=16, num_lstm_layers=1, codebook_dim=16)


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENTRY_POINTS = {
    "features": lambda: importlib.import_module("bossa_jax.features").main,
    "codes": lambda: importlib.import_module("bossa_jax.data.codes").main,
    "symbolic": lambda: importlib.import_module("bossa_jax.symbolic.__main__").main,
    "encodec": lambda: importlib.import_module("convert.encodec").main,
    "musicgen": lambda: importlib.import_module("convert.musicgen").main,
    "musicbert": lambda: importlib.import_module("convert.musicbert").main,
    "bossa": lambda: importlib.import_module("convert.bossa").main,
    "musecoco": lambda: importlib.import_module("convert.musecoco").main,
    "train": lambda: _script("train.py").main,
    "generate": lambda: _script("generate.py").main,
}


def snapshot(root: Path) -> dict[str, tuple[float, int] | None]:
    """Every path under ``root`` (hidden ones too) with its modification time and size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            out[str(path.relative_to(root))] = (
                None if path.is_dir() else (stat.st_mtime, stat.st_size)
            )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs of every kind, good and bad, and folders a user already had."""
    w = tmp_path_factory.mktemp("world")
    soundfile.write(w / "good.wav", _tone(1.5), SR)
    soundfile.write(w / "silence.wav", np.zeros(2 * SR, np.float32), SR)
    soundfile.write(w / "short.wav", _tone(0.2), SR)
    raw = (w / "good.wav").read_bytes()
    (w / "corrupt.wav").write_bytes(raw[:8] + b"XXXXXXXX" + raw[16:])
    (w / "notes.txt").write_text("a regular file\n")
    (w / "mydir").mkdir()
    (w / "mydir" / "keep.txt").write_text("keep me\n")
    model = random_module(lambda: EncodecEncoder(ENCODEC_CFG, rngs=nnx.Rngs(0)), 0)
    checkpoint.save_module(w / "encodec", model, config_section(ENCODEC_CFG))
    synthetic.write_pop909_song(w / "pop909", "001", bars=4, seed=0, audio_root=w / "audio")
    (w / "oldrun" / "checkpoints" / "4").mkdir(parents=True)  # a training run's folder
    (w / "oldrun" / "config.yaml").write_text("name: tiny\n")
    (w / "include5.yaml").write_text("include: 5\n")
    (w / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    return w


W = "{w}"  # rows name paths relative to the world folder
# tiny random models: a row that got past the checks (as on the code before issue 7) stays cheap
RANDOM_TINY = ["--random-init", "0", "--config", TINY, "audio.clip_frames=50", "--no-progress"]
FEATURES = ["--out", "{w}/f.npz", *RANDOM_TINY]
NO_CHECKPOINTS = ["--out", "{w}/f.npz", "--musicgen", "{w}/none", "--encodec", "{w}/none"]
CODES = [
    "--encodec",
    "{w}/encodec",
    "--dataset",
    "pop909",
    "--data-dir",
    "{w}/pop909",
    "--audio-dir",
    "{w}/audio",
]
EVAL = ["eval-retrieval", "--config", TINY, "--checkpoint", "{w}/none"]
# (entry point, argv, text the error line must contain)
# fmt: off
ROWS = [
    # features
    ("features", ["{w}/missing.wav", *FEATURES], "not found"),
    ("features", ["{w}/corrupt.wav", *FEATURES], "corrupt"),
    # silence and too short are found before any checkpoint is read (they are missing)
    ("features", ["{w}/silence.wav", *NO_CHECKPOINTS], "silence.wav: audio is silent"),
    ("features", ["{w}/short.wav", *NO_CHECKPOINTS], "at least 0.5 s"),
    ("features", ["{w}/good.wav", *FEATURES, "audio.bogus=1"], "audio.bogus"),
    ("features", ["{w}/good.wav", "--out", "{w}/f.npz", "--config", "{w}/none.yaml",
                  "--random-init", "0"], "none.yaml"),
    ("features", ["{w}/good.wav", *FEATURES, "--bogus"], "unrecognized arguments"),
    ("features", ["{w}/good.wav", "--out", "{w}/notes.txt/f.npz", *RANDOM_TINY],
     "is a file and not a folder"),
    ("features", ["{w}/good.wav", "--out", ".", *RANDOM_TINY], "give a new folder name"),
    ("features", ["{w}/good.wav", "--out", "{w}/notes.txt", *RANDOM_TINY], "is a file"),
    ("features", ["{w}/good.wav", "--out", "/sys/bossa-feats", *RANDOM_TINY],
     "cannot write in"),
    ("features", ["{w}/good.wav", "--out", "{w}/good.wav", *RANDOM_TINY], "is the input"),
    # data.codes
    ("codes", [*CODES, "--out", "{w}/c", "--chunk-seconds", "0.001"], "--chunk-seconds"),
    ("codes", [*CODES, "--out", "{w}/c", "--chunk-seconds", "nan"], "--chunk-seconds"),
    ("codes", ["--encodec", "{w}/encodec", "--dataset", "manifest", "--data-dir", "{w}/good.wav",
               "--out", "{w}/c"], "not a text file"),
    ("codes", [*CODES, "--out", "{w}/notes.txt"], "is a file"),
    ("codes", [*CODES, "--out", "{w}/mydir"], "not a codes store"),
    # symbolic
    ("symbolic", ["tokens", "{w}/missing.mid", "--codec", "remi"], "missing.mid"),
    ("symbolic", ["tokens", LEADSHEET, "--codec", "bogus"], "invalid choice"),
    ("symbolic", ["segments", LEADSHEET, "--audio", "{w}/short.wav"], "at least 0.5 s"),
    ("symbolic", ["segments", LEADSHEET, "--audio", "{w}/silence.wav"], "audio is silent"),
    # converters
    ("encodec", ["{w}/missing", "{w}/out"], "missing"),
    ("encodec", ["{w}/hf", "{w}/hf"], "is the input"),
    ("encodec", ["{w}/hf", "{w}/mydir"], "not written by bossa-jax"),
    ("musicgen", ["{w}/missing.pt", "{w}/out", "--bogus"], "unrecognized arguments"),
    ("musicgen", ["{w}/hf", "{w}/notes.txt"], "is a file"),
    ("musicbert", ["{w}/missing.pt", "{w}/out", "--config", TINY, "qformer.bogus=1"],
     "qformer.bogus"),
    ("bossa", ["{w}/missing.pt", "{w}/out", "--config", TINY], "--stage"),
    ("musecoco", ["{w}/mydir", "{w}/mydir"], "is the input"),
    ("musecoco", ["{w}/missing", "{w}/out", "--dtype", "float16"], "invalid choice"),
    # bad configs and overrides: one line naming the key or the file, before any work
    ("features", ["{w}/good.wav", *FEATURES, "qformer.num_attention_heads=0"],
     "qformer.num_attention_heads"),
    ("features", ["{w}/good.wav", *FEATURES, "musicgen.ffn_dim=-64"], "musicgen.ffn_dim"),
    ("musicbert", ["{w}/missing.pt", "{w}/out", "--config", TINY, "qformer.hidden_size=-32"],
     "qformer.hidden_size"),
    ("train", ["stage1", "--config", "{w}/include5.yaml"], "include"),
    ("train", ["stage1", "--config", "{w}/latin1.yaml"], "latin1.yaml"),
    ("train", ["stage1", "--config", TINY, "train.optim.lr=1e-4x"], "train.optim.lr"),
    ("train", [*EVAL, "audio.min_seconds=-1"], "audio.min_seconds"),
    # train.py and generate.py
    ("train", ["stage1", "--config", TINY, "train.bogus=1"], "train.bogus"),
    ("train", ["stage1", "--config", TINY, "train.out_dir={w}/oldrun"], "--overwrite"),
    ("train", ["stage1", "--config", TINY, "train.out_dir={w}/oldrun", "--resume", "--overwrite"],
     "exclude each other"),
    ("train", ["stage1", "--config", TINY, "train.out_dir={w}/new", "data.random_musicgen=false"],
     "data.musicgen_checkpoint"),
    ("train", ["export", "{w}/oldrun", "{w}/mydir"], "not written by bossa-jax"),
    ("train", ["export", "{w}/mydir", "{w}/out", "--config", TINY], "not a stage-1 run"),
    ("train", [*EVAL, "--out", "{w}/mydir"], "is a folder"),
    ("train", [*EVAL, "--out", "{w}/notes.txt/r.json"], "is a file and not a folder"),
    ("train", ["stage2"], "--config"),
    ("train", ["stage2", "--config", TINY, "stage2.bogus=1"], "stage2.bogus"),
    ("generate", ["--checkpoint", "{w}/none", "--no-render"], "python -m convert.bossa"),
    ("generate", ["--checkpoint", "{w}/mydir", "--no-render"], "not a bossa-jax checkpoint"),
    ("generate", ["--bars", "5", "--no-render"], "--bars"),
    ("generate", ["--out", "{w}/mydir", "--no-render"], "not written by bossa-jax"),
    ("generate", ["--out", "{w}/good.wav", "--audio", "{w}/good.wav"], "is the input"),
    ("generate", ["--manifest", "{w}/notes.txt", "--no-render"], "notes.txt:1: not a JSON object"),
    ("generate", ["--lead-sheet", LEADSHEET], "unrecognized arguments"),
]
# fmt: on


@pytest.fixture(scope="module")
def hf_dir(world):
    """A tiny Hugging Face EnCodec folder (what users convert)."""
    from tests.models.test_encodec import tiny_hf_model

    tiny_hf_model(2).save_pretrained(world / "hf")
    return world / "hf"


def run_in_process(entry: str, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ENTRY_POINTS[entry](), argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, expect: str) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert expect in errors[0], (expect, errors[0])


@pytest.mark.parametrize(
    "entry, argv, expect", ROWS, ids=[f"{r[0]}-{i}" for i, r in enumerate(ROWS)]
)
def test_bad_input_is_one_line_and_changes_nothing(
    world, entry, argv, expect, capsys, monkeypatch, request
):
    if "{w}/hf" in argv:
        request.getfixturevalue("hf_dir")
    if "/sys/" in " ".join(argv) and not Path("/sys").is_dir():
        pytest.skip("needs /sys (a place no process can create files in)")
    monkeypatch.chdir(world)
    argv = [a.replace(W, str(world)) for a in argv]
    before = snapshot(world)
    code, err = run_in_process(entry, argv, capsys)
    assert_one_error_line(code, err, expect)
    assert snapshot(world) == before


# --- user files survive every kind of output ----------------------------------------------------
def test_converter_output_never_deletes_user_files(world, hf_dir, capsys):
    """Was: ``convert.encodec HF ckpt`` replaced ckpt/ (a user's folder) by the checkpoint, and
    ``convert.encodec D D`` deleted the source weights."""
    ckpt = world / "ckpt"
    (ckpt / "musicgen").mkdir(parents=True)
    (ckpt / "notes.txt").write_text("n")
    before = snapshot(world)
    for out in (ckpt, hf_dir):
        code, err = run_in_process("encodec", [str(hf_dir), str(out)], capsys)
        assert_one_error_line(code, err, str(out))
        assert snapshot(world) == before
    # a new folder inside the user's folder is fine; re-running needs --overwrite
    out = ckpt / "encodec"
    assert run_in_process("encodec", [str(hf_dir), str(out)], capsys)[0] == 0
    code, err = run_in_process("encodec", [str(hf_dir), str(out)], capsys)
    assert_one_error_line(code, err, "pass --overwrite")
    mtime = (out / "config.yaml").stat().st_mtime_ns
    assert run_in_process("encodec", [str(hf_dir), str(out), "--overwrite"], capsys)[0] == 0
    assert (out / "config.yaml").stat().st_mtime_ns != mtime  # replaced
    assert (ckpt / "notes.txt").read_text() == "n" and (ckpt / "musicgen").is_dir()
    # a previous output of another kind, or one holding a user's file, is not replaced
    argv = [str(world / "good.wav"), "--out", str(out), *RANDOM_TINY, "--overwrite"]
    code, err = run_in_process("features", argv, capsys)
    assert_one_error_line(code, err, "holds a bossa-jax encodec checkpoint, not a features")
    (out / "mine.txt").write_text("m")
    code, err = run_in_process("encodec", [str(hf_dir), str(out), "--overwrite"], capsys)
    assert_one_error_line(code, err, "did not write (mine.txt)")
    assert (out / "mine.txt").read_text() == "m"


def test_features_output_never_deletes_user_files(world, capsys):
    """Was: ``features x.wav --out mydir`` deleted mydir/keep.txt."""
    common = RANDOM_TINY
    before = snapshot(world)
    code, err = run_in_process(
        "features", [str(world / "good.wav"), "--out", str(world / "mydir"), *common], capsys
    )
    assert_one_error_line(code, err, "not written by bossa-jax")
    assert snapshot(world) == before
    archive = world / "mydir" / "previous.npz"  # an existing file: replaced only with --overwrite
    archive.write_bytes(b"an earlier archive")
    before = snapshot(world)
    code, err = run_in_process(
        "features", [str(world / "good.wav"), "--out", str(archive), *common], capsys
    )
    assert_one_error_line(code, err, "pass --overwrite")
    assert snapshot(world) == before
    archive.unlink()


def test_codes_store_never_writes_into_a_user_folder(world, capsys):
    before = snapshot(world)
    argv = [
        "--encodec", str(world / "encodec"), "--dataset", "pop909", "--data-dir",
        str(world / "pop909"), "--audio-dir", str(world / "audio"), "--chunk-seconds", "2",
    ]  # fmt: skip
    for out, expect in [(world / "mydir", "not a codes store"), (world / "pop909" / "c", "inside")]:
        code, err = run_in_process("codes", [*argv, "--out", str(out)], capsys)
        assert_one_error_line(code, err, expect)
        assert snapshot(world) == before


# --- process behaviour (subprocesses) -----------------------------------------------------------
def _python(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_closed_stdout_pipe_exits_quietly(world):
    """Was: ``python -m bossa_jax.symbolic tokens F | head`` printed a BrokenPipeError traceback."""
    script = (
        f"{sys.executable} -m bossa_jax.symbolic tokens {LEADSHEET} --codec octuple | head -n 0; "
        "echo status=${PIPESTATUS[0]}"
    )
    proc = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.stderr == "", proc.stderr
    assert proc.stdout == "status=141\n", proc.stdout  # SIGPIPE's status, as Unix tools give


def test_codes_keeps_library_logging_off_the_terminal(world):
    """Was: every data.codes run printed ~20 orbax INFO lines on stderr."""
    out = world / "codes-store"
    proc = _python(
        "-m", "bossa_jax.data.codes", "--encodec", str(world / "encodec"), "--dataset", "pop909",
        "--data-dir", str(world / "pop909"), "--audio-dir", str(world / "audio"),
        "--out", str(out), "--chunk-seconds", "2", cwd=world, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout
    noisy = [line for line in proc.stderr.splitlines() if "orbax" in line.lower() or "INFO" in line]
    assert not noisy, noisy


def test_orphaned_orbax_task_errors_stay_off_the_terminal(caplog):
    """After a failed restore, asyncio logs the pending orbax reads' tracebacks when they are
    collected ("Task exception was never retrieved"): dropped unless --verbose."""
    import logging

    from bossa_jax import cli

    asyncio_log = logging.getLogger("asyncio")
    try:
        cli.setup_logging(verbose=False)
        asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished>")
        asyncio_log.error("another asyncio error")
        logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
        assert logged == ["another asyncio error"]
    finally:
        asyncio_log.removeFilter(cli._drop_orphaned_task_errors)
