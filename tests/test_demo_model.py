"""The shipped BOSSA-mini demo model (bossa_jax/assets/demo_model/, made by ``train.py mini``):
within the size limit, packaged, and it loads with its config and samples an arrangement start
for the built-in lead sheet in the style of the built-in clip within seconds."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from bossa_jax import mel
from bossa_jax.assets import DEMO_LEADSHEET, DEMO_MODEL, DEMO_STYLE
from bossa_jax.models.arranger import POSITION_START, load_stage2
from bossa_jax.sampling import Sampler
from bossa_jax.symbolic import remi
from bossa_jax.symbolic.leadsheet import read_leadsheet
from bossa_jax.symbolic.notes import BAR
from bossa_jax.train.mini import load_run_config, model_size_bytes

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 20 * 2**20


def test_size_note_and_package_data():
    assert (DEMO_MODEL / "NOTE.md").is_file()
    assert 0 < model_size_bytes(DEMO_MODEL) <= LIMIT_BYTES
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = globs["package-data"]["bossa_jax"]
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assets = ROOT / "bossa_jax"
    for path in files:  # every file of the model is package data
        relative = path.relative_to(assets).as_posix()
        depth = relative.count("/")  # setuptools globs: "*" never crosses a folder
        assert any(g.count("/") == depth and fnmatch(relative, g) for g in globs), path


def test_loads_and_samples_in_the_style_of_the_demo_clip():
    config = load_run_config(DEMO_MODEL)
    assert config.audio.frontend == "mel"
    model = load_stage2(DEMO_MODEL)
    assert model.musicgen is None and model.musecoco.cfg.lora
    features, mask = mel.file_features(DEMO_STYLE, config)
    prefix = model.style_prefix(mask[None], features=features[None])
    assert prefix.shape == (1, config.qformer.num_query_tokens, config.musecoco.hidden_size)
    leadsheet = read_leadsheet(DEMO_LEADSHEET).leadsheet
    prompt = remi.prompt(leadsheet.bars(0, 4))
    samples = Sampler(model.musecoco)(
        [prompt], max_new_tokens=48, prefix_embeddings=prefix, position_start=POSITION_START,
        seed=0,
    )  # fmt: skip
    tokens = samples.new_tokens(0)
    assert len(tokens) > 0 and ((tokens >= 0) & (tokens < remi.VOCAB_SIZE)).all()
    rows, skipped = remi.decode(tokens)
    # a trained model starts an arrangement: notes in the first bar, hardly any stray token
    assert len(rows) >= 3 and (rows[:, BAR] == 0).any()
    assert skipped <= 8
    again = Sampler(model.musecoco)(
        [prompt], max_new_tokens=48, prefix_embeddings=prefix, position_start=POSITION_START,
        seed=0,
    )  # fmt: skip
    np.testing.assert_array_equal(again.new_tokens(0), tokens)  # deterministic for a seed


def test_arranges_the_demo_with_the_melody_placed_and_the_rest_drawn():
    from bossa_jax.arrange import Arranger, SongRequest
    from bossa_jax.evaluate_style import melody_of, melody_preservation

    config = load_run_config(DEMO_MODEL)
    assert config.arrange.melody_lock  # the BOSSA-mini config places the melody
    song = read_leadsheet(DEMO_LEADSHEET)
    arranger = Arranger.from_checkpoint(DEMO_MODEL, config)
    (piece,) = arranger([SongRequest("demo", song, str(DEMO_STYLE), bars=(0, 4))], seed=0)
    events = remi.decode(piece.tokens)[0]
    lead = song.leadsheet.bars(0, 4).events
    assert piece.bars == 4 and melody_preservation(events, lead) == 1.0
    assert len(events) >= 2 * len(melody_of(lead))  # and an accompaniment the model drew
