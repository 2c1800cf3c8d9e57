"""generate.py end to end on the tiny config (issue 10 items 3-4): a tiny random stage-2 checkpoint
(mel front end, written by ``save_stage2``) arranges the demo lead sheet; the MIDI reads back with
symusic and pretty_midi and has the lead sheet's bars; WAV and piano roll; the batch mode arranges
the good songs of a manifest with a bad one; every bad input is one line and leaves no output.

Runs in-process through ``errors.run_cli`` and ``bossa_jax.generate.main`` (what ``python
generate.py`` runs), so the compiled programs are shared by the tests of this module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pretty_midi
import pytest
import soundfile
import symusic
from flax import nnx

from bossa_jax import audio, generate, render, sharding
from bossa_jax.assets import DEMO_LEADSHEET
from bossa_jax.config import load_config
from bossa_jax.errors import BossaError, run_cli
from bossa_jax.models.arranger import Stage2Model, save_stage2
from bossa_jax.outputs import MARKER
from bossa_jax.symbolic import remi
from tests.mel_config import mel_overrides
from tests.symbolic.conftest import build_score

N_MELS = 16
MEL = mel_overrides(N_MELS)
# a window needs at most 4 bars of BAR_CYCLE (24 tokens); the cap keeps a broken model fast
FAST = ["arrange.max_new_tokens=32"]
LEADSHEET_BARS = 16  # the demo lead sheet: 16 bars of 4/4
HAVE_FLUIDSYNTH = shutil.which("fluidsynth") is not None and any(
    (render.SOUNDFONT_DIR / n).is_file() for n in render.SOUNDFONT_NAMES
)


def tone(path, seconds: float, amplitude: float = 0.3):
    t = np.arange(round(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    y = amplitude * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t))
    soundfile.write(str(path), y.astype(np.float32), audio.SAMPLE_RATE)
    return path


BAR_CYCLE = ["o-0", "i-0", "p-60", "d-12", "v-20", "b-1"]  # one quarter-note C4 per bar


def one_note_bars(model: Stage2Model) -> None:
    """Makes the random model write music: MuseCoco's blocks add nothing (their output
    projections are zero), so the logits depend on the last token only, and its embeddings and
    head map each token of :data:`BAR_CYCLE` (and ``<sep>``, which ends a prompt) to the next one.
    Every window then samples whole one-note bars until its bar limit stops it."""
    mc = model.musecoco
    for proj in (mc.layers.self_attn.out_proj, mc.layers.mlp.fc2):
        proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
        proj.bias[...] = jnp.zeros_like(proj.bias[...])
    embedding = np.array(mc.embed_tokens.embedding[...])
    head = np.array(mc.lm_head.kernel[...])
    cycle = [remi.VOCAB[t] for t in BAR_CYCLE]
    following = [*cycle[1:], cycle[0], cycle[0]]
    for k, (token, nxt) in enumerate(zip([*cycle, remi.SEP], following, strict=True)):
        embedding[token] = 0.0
        embedding[token, k] = 3.0  # x sqrt(64): dominates the sinusoidal positions
        x = embedding[token] * mc.embed_scale
        head[:, nxt] += (x - x.mean()) / x.std()  # what the final LayerNorm makes of it
    mc.embed_tokens.embedding[...] = jnp.asarray(embedding)
    mc.lm_head.kernel[...] = jnp.asarray(head)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny checkpoint, its config file, good and bad inputs."""
    w = tmp_path_factory.mktemp("generate")
    cfg = load_config("tiny", MEL)
    model = sharding.create_sharded(
        lambda: Stage2Model(cfg.qformer, cfg.musecoco, None, rngs=nnx.Rngs(0))
    )
    one_note_bars(model)
    save_stage2(w / "ckpt", model)
    for name, edit in (("wrong-shape", ("ffn_dim: 128", "ffn_dim: 96")),
                       ("stage1", ("name: bossa_stage2", "name: bossa_stage1"))):  # fmt: skip
        shutil.copytree(w / "ckpt", w / name)
        text = (w / name / "config.yaml").read_text()
        assert edit[0] in text
        (w / name / "config.yaml").write_text(text.replace(*edit))
    (w / "tiny-mel.yaml").write_text(cfg.to_yaml())
    tone(w / "ref.wav", 12.0)
    soundfile.write(str(w / "silent.wav"), np.zeros(audio.SAMPLE_RATE * 2, np.float32), 32000)
    tone(w / "short.wav", 0.2)
    raw = (w / "ref.wav").read_bytes()
    (w / "corrupt.wav").write_bytes(raw[:8] + b"XXXXXXXX" + raw[16:])
    (w / "empty.mid").write_bytes(b"")
    (w / "text.mid").write_text("not a MIDI file\n")
    drums = [(i * 480, 240, 36, 100) for i in range(8)]
    build_score([(0, True, drums, "drums")]).dump_midi(str(w / "drums.mid"))
    build_score([(0, False, [], "empty")]).dump_midi(str(w / "nonotes.mid"))
    (w / "song.abc").write_text(
        'X:1\nM:4/4\nL:1/4\nQ:1/4=100\nK:C\n"C"e2 g2|"Am"a2 e2|"F"f4|"G7"d2 g2|\n'
    )
    (w / "mydir").mkdir()
    (w / "mydir" / "keep.txt").write_text("keep me\n")
    return w


def base_args(w, out: str = "out", *extra: str) -> list[str]:
    return [
        "--checkpoint", str(w / "ckpt"), "--config", str(w / "tiny-mel.yaml"),
        "--out", str(w / out), "--no-progress", *FAST, *extra,
    ]  # fmt: skip


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        run_cli(generate.main, argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def pretty_midi_bars(path) -> int:
    return len(pretty_midi.PrettyMIDI(str(path)).get_downbeats())


@pytest.fixture(scope="module")
def single(world):
    """One arrangement of the whole demo lead sheet, rendered."""
    if not HAVE_FLUIDSYNTH:
        pytest.skip("needs fluidsynth and a General MIDI soundfont")
    argv = base_args(world, "single", "--leadsheet", str(DEMO_LEADSHEET), "--audio",
                     str(world / "ref.wav"), "--seed", "3")  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit) as info:
            run_cli(generate.main, argv)
    return info.value.code, out.getvalue(), err.getvalue(), world / "single"


def test_one_song_end_to_end(single):
    code, out, err, folder = single
    assert code == 0, err
    names = sorted(os.listdir(folder))
    assert names == sorted([MARKER, "arrangement.mid", "arrangement.png", "arrangement.wav",
                            "config.yaml"])  # fmt: skip
    midi = folder / "arrangement.mid"
    score = symusic.Score(str(midi))
    pm = pretty_midi.PrettyMIDI(str(midi))
    assert pretty_midi_bars(midi) == LEADSHEET_BARS  # the lead sheet's bars, no overrun
    assert sum(len(i.notes) for i in pm.instruments) == score.note_num() == LEADSHEET_BARS
    onsets = sorted(n.start for i in pm.instruments for n in i.notes)
    np.testing.assert_allclose(onsets, pm.get_downbeats(), atol=1e-6)  # one note on each bar
    assert f"{LEADSHEET_BARS} bars, {score.note_num()} notes" in out
    assert "tokens/s" in out and len(out.strip().splitlines()) == 1
    samples, rate = soundfile.read(str(folder / "arrangement.wav"))
    assert rate == render.RENDER_RATE and samples.ndim == 2
    assert (folder / "arrangement.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(folder / "config.yaml").arrange.max_new_tokens == 32


def test_same_seed_same_midi_and_overwrite(world, single, capsys):
    argv = base_args(world, "single", "--leadsheet", str(DEMO_LEADSHEET), "--audio",
                     str(world / "ref.wav"), "--seed", "3", "--no-render")  # fmt: skip
    before = (world / "single" / "arrangement.mid").read_bytes()
    code, _, err = run(argv, capsys)
    assert code == 2 and "pass --overwrite" in err
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert (world / "single" / "arrangement.mid").read_bytes() == before
    assert sorted(os.listdir(world / "single")) == [MARKER, "arrangement.mid", "config.yaml"]


def test_bars_and_pedal(world, capsys):
    argv = base_args(world, "bars", "--leadsheet", str(DEMO_LEADSHEET), "--audio",
                     str(world / "ref.wav"), "--bars", "2:8", "--pedal", "--no-render")  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 0, err
    midi = world / "bars" / "arrangement.mid"
    assert pretty_midi_bars(midi) == 6 and "6 bars" in out
    pedals = [c for t in symusic.Score(str(midi)).tracks for c in t.controls if c.number == 64]
    assert pedals  # the sustain pedal of SPEC 8.2


def test_batch_arranges_the_good_songs_and_reports_the_bad(world, capsys):
    manifest = world / "songs.jsonl"
    lines = [
        {"id": "demo", "leadsheet": str(DEMO_LEADSHEET), "audio": "ref.wav", "bars": "0:4"},
        {"leadsheet": "song.abc", "audio": "ref.wav"},
        {"id": "broken", "leadsheet": "text.mid", "audio": "ref.wav"},
        {"id": "quiet", "leadsheet": str(DEMO_LEADSHEET), "audio": "silent.wav", "bars": [0, 2]},
    ]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, out, err = run(base_args(world, "batch", "--manifest", str(manifest), "--no-render"),
                         capsys)  # fmt: skip
    assert code == generate.EXIT_SOME_FAILED, err
    folder = world / "batch"
    assert sorted(os.listdir(folder)) == sorted([MARKER, "config.yaml", "demo", "song",
                                                 "summary.json"])  # fmt: skip
    assert pretty_midi_bars(folder / "demo" / "arrangement.mid") == 4
    assert pretty_midi_bars(folder / "song" / "arrangement.mid") == 4  # the ABC lead sheet
    summary = {r["id"]: r for r in json.loads((folder / "summary.json").read_text())}
    assert [summary[k]["status"] for k in ("demo", "song", "broken", "quiet")] == [
        "ok", "ok", "failed", "failed"]  # fmt: skip
    assert "text.mid" in summary["broken"]["error"] and "silent" in summary["quiet"]["error"]
    assert "skipped broken" in err and "skipped quiet" in err and "error:" not in err
    table = out.strip().splitlines()
    assert table[0].split()[:2] == ["id", "status"] and "2 of 4 songs arranged" in table[-1]


def test_batch_with_no_good_song_is_an_error_and_writes_nothing(world, capsys):
    manifest = world / "bad.jsonl"
    manifest.write_text(json.dumps({"leadsheet": "empty.mid", "audio": "ref.wav"}) + "\n")
    code, _, err = run(base_args(world, "batch-bad", "--manifest", str(manifest)), capsys)
    assert code == 2 and "no song could be arranged" in err and "empty.mid" in err
    assert not (world / "batch-bad").exists()


W = "{w}"
# fmt: off
ERRORS = [
    # lead sheets
    (["--leadsheet", "{w}/missing.mid"], "missing.mid: no such MIDI file"),
    (["--leadsheet", "{w}/empty.mid"], "empty.mid: the file is empty"),
    (["--leadsheet", "{w}/text.mid"], "text.mid: not a standard MIDI file"),
    (["--leadsheet", "{w}/drums.mid"], "drums.mid: the lead sheet has no melody"),
    (["--leadsheet", "{w}/nonotes.mid"], "nonotes.mid: the MIDI file contains no notes"),
    (["--leadsheet", "{w}/ref.wav"], "unknown lead-sheet format"),
    # audio
    (["--audio", "{w}/missing.wav"], "missing.wav"),
    (["--audio", "{w}/corrupt.wav"], "corrupt.wav"),
    (["--audio", "{w}/silent.wav"], "silent.wav: audio is silent"),
    (["--audio", "{w}/short.wav"], "short.wav"),
    # bars and flags
    (["--bars", "10:40"], "--bars 10:40: outside the piece"),
    (["--bars", "4:2"], "--bars: bars must be A:B"),
    (["--bars", "x"], "--bars: bars must be A:B"),
    (["--top-k", "0"], "--top-k"),
    (["--temperature", "0"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--manifest", "{w}/songs.jsonl"], "--manifest replaces"),
    (["arrange.bogus=1"], "arrange.bogus"),
    # checkpoints
    (["--checkpoint", "{w}/none"], "python -m convert.bossa"),
    (["--checkpoint", "{w}/mydir"], "mydir: not a bossa-jax checkpoint"),
    (["--checkpoint", "{w}/wrong-shape"], "wrong-shape: "),
    (["--checkpoint", "{w}/stage1"], "stage1: not a BOSSA stage-2 checkpoint"),
    # outputs
    (["--out", "{w}/mydir"], "not written by bossa-jax"),
    (["--out", "{w}/ref.wav"], "is the input"),
]
# fmt: on


@pytest.mark.parametrize("extra, expect", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_bad_input_is_one_line_and_writes_nothing(world, extra, expect, capsys):
    extra = [a.replace(W, str(world)) for a in extra]
    argv = base_args(world, "err", "--leadsheet", str(DEMO_LEADSHEET), "--audio",
                     str(world / "ref.wav"), "--no-render")  # fmt: skip
    for flag in ("--leadsheet", "--audio", "--checkpoint", "--out"):
        if flag in extra:  # the row's value replaces the default one
            i = argv.index(flag)
            del argv[i : i + 2]
    code, out, err = run([*argv, *extra], capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert not (world / "err").exists()
    assert sorted(os.listdir(world / "mydir")) == ["keep.txt"]


def test_missing_default_checkpoint_says_how_to_get_one(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setattr(generate, "DEFAULT_CHECKPOINT", world / "no-demo-model")
    code, _, err = run(["--no-render", "--out", "o2"], capsys)
    assert code == 2 and "train.py mini" in err and "convert.bossa" in err
    assert not (world / "o2").exists()


GOOD_LINE = '{"leadsheet": "a.mid", "audio": "a.wav"}'


@pytest.mark.parametrize(
    "text, expect",
    [
        ('{"leadsheet": "a.mid", "audio": "a.wav", "tempo": 3}', ":2: unknown key 'tempo'"),
        ('{"leadsheet": "b.mid"}', ":2: 'audio' must be a file path"),
        ('{"leadsheet": "x/a.mid", "audio": "b.wav"}', ":2: id 'a' is used by"),
        ('{"id": "../up", "leadsheet": "b.mid", "audio": "b.wav"}', ":2: id '../up' must be"),
        ('{"id": "b", "leadsheet": "b.mid", "audio": "b.wav", "bars": "3"}', ":2 bars: bars must"),
        (
            '{"id": "b", "leadsheet": "b.mid", "audio": "b.wav", "bars": [4, 1]}',
            ":2 bars: bars must",
        ),
        ("{not json", ":2: not a JSON object"),
        ('["a.mid", "a.wav"]', ":2: expected a JSON object"),
    ],
)
def test_malformed_manifest_lines_name_file_and_line(tmp_path, text, expect):
    manifest = tmp_path / "songs.jsonl"
    manifest.write_text(f"{GOOD_LINE}\n{text}\n")
    with pytest.raises(BossaError) as info:
        generate.read_manifest(manifest)
    assert f"{manifest}{expect}" in str(info.value) and "\n" not in str(info.value)


def test_manifest_paths_are_relative_to_its_folder(tmp_path):
    manifest = tmp_path / "sub" / "songs.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(f'\n{GOOD_LINE}\n{{"id": "b", "leadsheet": "/x/b.abc", "audio": "b.wav", '
                        '"bars": "2:6"}\n')  # fmt: skip
    jobs = generate.read_manifest(manifest)
    assert [(j.id, j.leadsheet, j.audio, j.bars, j.where) for j in jobs] == [
        ("a", manifest.parent / "a.mid", manifest.parent / "a.wav", None, f"{manifest}:2"),
        ("b", Path("/x/b.abc"), manifest.parent / "b.wav", (2, 6), f"{manifest}:3"),
    ]
    manifest.write_text("\n\n")
    with pytest.raises(BossaError, match="lists no song"):
        generate.read_manifest(manifest)


def test_config_and_soundfont_errors(world, capsys):
    common = ["--leadsheet", str(DEMO_LEADSHEET), "--audio", str(world / "ref.wav"),
              "--checkpoint", str(world / "ckpt"), "--out", str(world / "err")]  # fmt: skip
    cases = [
        # no --config and no run_config.yaml beside a checkpoint without MusicGen
        (["--no-render"], "give the config it was trained with (--config)"),
        # the config's front end does not fit the checkpoint
        (["--no-render", "--config", "tiny"], "audio.frontend"),
        (["--soundfont", str(world / "none.sf2")], "none.sf2: soundfont not found"),
    ]
    for extra, expect in cases:
        code, _, err = run([*common, *extra], capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and expect in lines[0], err
        assert not (world / "err").exists()


def test_the_script_runs_as_a_program(tmp_path):
    """``python generate.py`` itself: a missing checkpoint is one line and exit status 2."""
    world = tmp_path
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, str(root / "generate.py"), "--checkpoint", str(world / "none"),
         "--no-render", "--out", str(world / "script-out")],
        cwd=world, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "none: no stage-2 checkpoint there" in proc.stderr
    assert not (world / "script-out").exists()
