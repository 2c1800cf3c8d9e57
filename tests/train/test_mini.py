"""The BOSSA-mini recipe (bossa_jax/train/mini.py, bossa_jax/train/lm.py, ``train.py mini``) at tiny
size through the real entry point: a 6-song corpus, a few steps per stage; every stage's loss
decreases, every file it writes is valid (the stage-0 LM, the stage-1 and stage-2 checkpoints with
the run config), the final model loads and samples, a second run into the same folder is refused
without --resume / --overwrite, --resume skips finished stages, and bad input is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.train.mini_recipe import (
    LOOP,
    TINY,
    build_folder,
    env,
    mini_command,
    start_build,
    wait_for_build,
)

STAGES = ("stage0", "stage1", "stage2")


def _mini(tmp: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        mini_command(*args), cwd=tmp, env=env(tmp), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def recipe(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(run folder, the command's result) of the session's one tiny recipe (mini_recipe.py;
    tests/conftest.py starts it in the background at the session's start)."""
    folder = build_folder(tmp_path_factory.getbasetemp())
    start_build(folder)  # a no-op when the session's start (or another worker) began it
    out, result = wait_for_build(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def _train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_learns(recipe, stage):
    out, _ = recipe
    losses = _train_losses(out / stage)
    steps = 12 if stage == "stage2" else LOOP["total_steps"]
    assert len(losses) == steps // LOOP["log_every"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses
    assert (out / stage / "tb").is_dir() and (out / stage / "config.yaml").is_file()


def test_files_are_valid_and_the_final_model_samples(recipe):
    from bossa_jax.config import load_config
    from bossa_jax.models.arranger import POSITION_START, load_stage2
    from bossa_jax.models.bossa import load_stage1
    from bossa_jax.models.musecoco import load_musecoco
    from bossa_jax.sampling import Sampler
    from bossa_jax.symbolic import remi
    from bossa_jax.train import mini

    out, result = recipe
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"model": str(out / "model")}
    lm = load_musecoco(out / "stage0-lm")
    assert not lm.cfg.lora and lm.cfg.hidden_size == 32
    assert load_stage1(out / "stage1-model").qformer is not None
    config = mini.load_run_config(out / "model")
    assert config == load_config(out / "config.yaml")
    assert config.audio.frontend == "mel" and config.stage2.init_from == str(out / "stage1-model")
    model = load_stage2(out / "model")
    assert model.musecoco.cfg.lora and model.musicgen is None
    # the frozen LM inside the final model is the stage-0 export, untouched by stage 2
    np.testing.assert_array_equal(
        np.asarray(model.musecoco.embed_tokens.embedding[...]),
        np.asarray(lm.embed_tokens.embedding[...]),
    )
    features = np.zeros((1, 512, 16), np.float32)
    prefix = model.style_prefix(np.ones((1, 512), np.float32), features=features)
    prompt = remi.prompt(np.zeros((0, 8), np.int64))
    sampler = Sampler(model.musecoco)
    samples = sampler(
        [prompt], max_new_tokens=8, prefix_embeddings=prefix, position_start=POSITION_START
    )
    assert 1 <= samples.count[0] <= 8
    record = json.loads((out / "recipe.json").read_text())
    assert set(record["stages"]) == {"corpus", *STAGES}
    assert record["options"]["seed"] == 3 and record["model_bytes"] > 0
    manifest = (out / "corpus" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 6


def test_rerun_is_refused_and_resume_skips_finished_stages(recipe, tmp_path):
    tmp = tmp_path
    out = shutil.copytree(recipe[0], tmp / "run", symlinks=True)  # the shared run stays read-only
    refused = _mini(tmp, "--out", str(out), "--songs", "6", "--bars", "8", *TINY)
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    before = (out / "model" / "run_config.yaml").stat().st_mtime_ns
    again = ("--resume", "--songs", "6", "--bars", "8", "--seed", "3")
    resumed = _mini(tmp, "--out", str(out), *again, *TINY)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "model" / "run_config.yaml").stat().st_mtime_ns == before
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = _mini(tmp, "--out", str(foreign), *TINY)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--songs", "0"], "--songs"),
        (["stage0.train.total_steps=-1"], "stage0.train.total_steps"),
        (["--corpus", "nowhere"], "nowhere"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, says):
    result = _mini(tmp_path, "--out", str(tmp_path / "run"), *args, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert not (tmp_path / "run" / "stage0").exists()


def test_style_attribute_names_the_style_in_its_genre_slot():
    """Stage 0's style attribute (Stage0Config): a row with style k gets S4_<k>_0 at the prompt's
    S4_<k>_2 slot and nothing else changes; unlabelled rows (-1) and rate 0 keep the prompt."""
    import jax
    import jax.numpy as jnp

    from bossa_jax.symbolic import remi
    from bossa_jax.train.lm import with_style_attribute

    prompt = np.tile(remi.PROMPT_PREFIX_IDS, (3, 1))
    assert remi.to_strings(prompt[0, remi.GENRE_POSITION + 4 : remi.GENRE_POSITION + 5]) == [
        "S4_4_2"
    ]
    style = jnp.asarray([4, -1, 0])
    named = np.asarray(with_style_attribute(jnp.asarray(prompt), style, jax.random.key(0), 0.999))
    changed = np.argwhere(named != prompt)
    assert changed.tolist() == [[0, remi.GENRE_POSITION + 4], [2, remi.GENRE_POSITION]]
    assert remi.to_strings([named[0, remi.GENRE_POSITION + 4], named[2, remi.GENRE_POSITION]]) == [
        "S4_4_0",
        "S4_0_0",
    ]
    kept = with_style_attribute(jnp.asarray(prompt), style, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(np.asarray(kept), prompt)
    # the rate is a share of the labelled rows
    many = np.tile(remi.PROMPT_PREFIX_IDS, (400, 1))
    out = with_style_attribute(jnp.asarray(many), jnp.full(400, 1), jax.random.key(1), 0.5)
    slot = remi.GENRE_POSITION + 1
    share = float(np.mean(np.asarray(out)[:, slot] != many[:, slot]))
    assert 0.4 < share < 0.6


def test_style_labels_reach_stage_0(tmp_path):
    """The manifest's ``style`` reaches the song records and, through ``stage0.styles``, each
    example's style index; an unknown or missing label is -1. Config rules: at most 22 styles,
    and a rate needs the labels."""
    from types import SimpleNamespace

    from bossa_jax.config import load_config
    from bossa_jax.data import readers
    from bossa_jax.errors import ConfigError
    from bossa_jax.train.lm import style_indices

    line = {"arrangement": "a.mid", "leadsheet": "l.mid", "id": "s1", "style": "waltz"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(line) + "\n" + json.dumps({**line, "id": "s2", "style": None}))
    sources, _ = readers.manifest_sources(manifest)
    assert [s.style for s in sources] == ["waltz", None]

    records = [SimpleNamespace(style=s) for s in ("waltz", None, "jazz", "stride")]
    examples = [SimpleNamespace(song_index=i) for i in (3, 0, 0, 1, 2)]
    pipe = SimpleNamespace(index=SimpleNamespace(records=records, examples=examples))
    styles = ("stride", "bossa", "waltz")
    assert style_indices(pipe, styles).tolist() == [0, 2, 2, -1, -1]

    with pytest.raises(ConfigError, match="stage0.styles"):
        load_config("tiny", [f"stage0.styles=[{', '.join(f's{i}' for i in range(23))}]"])
    with pytest.raises(ConfigError, match="stage0.style_attribute_rate"):
        load_config("tiny", ["stage0.style_attribute_rate=0.5"])
