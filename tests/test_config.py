"""Configs: includes, overrides, and errors that name the key (issue 2 item 2)."""

import subprocess
import sys

import pytest

from bossa_jax.config import CONFIG_DIR, load_config, parse_overrides
from bossa_jax.errors import ConfigError


def test_paper_sizes():
    cfg = load_config(CONFIG_DIR / "paper.yaml")
    assert (cfg.musicgen.hidden_size, cfg.musicgen.num_attention_heads) == (2048, 32)
    assert (cfg.musicgen.ffn_dim, cfg.musicgen.keep_layers, cfg.musicgen.num_hidden_layers) == (
        8192,
        25,
        48,
    )
    assert cfg.musicgen.special_id == 2048
    assert cfg.encodec.upsampling_ratios == (8, 5, 4, 4)
    assert cfg.encodec.hop_length == 640 and cfg.encodec.frame_rate == 50.0
    assert (cfg.encodec.num_codebooks, cfg.encodec.codebook_size, cfg.encodec.codebook_dim) == (
        4,
        2048,
        128,
    )
    assert cfg.audio.pattern_steps == 512


def test_include_and_override(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        "musicgen:\n  hidden_size: 64\n  num_attention_heads: 4\nqformer:\n  encoder_width: 64\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("include: base.yaml\nname: child\nmusicgen:\n  keep_layers: 2\n")
    cfg = load_config(child, ["musicgen.ffn_dim=128", "mesh.shape.fsdp=2"])
    assert cfg.name == "child"
    assert (cfg.musicgen.hidden_size, cfg.musicgen.keep_layers, cfg.musicgen.ffn_dim) == (
        64,
        2,
        128,
    )
    assert dict(cfg.mesh.shape) == {"data": -1, "fsdp": 2, "tensor": 1}
    assert load_config(CONFIG_DIR / "tiny.yaml").musicgen.keep_layers == 3  # tiny includes paper


def test_named_config_and_round_trip(tmp_path):
    cfg = load_config("tiny")
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("musicgen.hiden_size=3", "musicgen.hiden_size"),
        ("bogus=1", "bogus"),
        ("musicgen.hidden_size=abc", "musicgen.hidden_size"),
        ("musicgen.hidden_size=1.5", "musicgen.hidden_size"),
        ("musicgen.num_attention_heads=7", "musicgen.num_attention_heads"),
        ("musicgen.keep_layers=49", "musicgen.keep_layers"),
        ("encodec.upsampling_ratios=[8, x]", "encodec.upsampling_ratios[1]"),
        ("mesh.shape.data=0", "mesh.shape"),
        ("musicgen.dtype=float8", "musicgen.dtype"),
        ("qformer.encoder_width=1024", "qformer.encoder_width"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(CONFIG_DIR / "paper.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("include: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(loop)
    bad = tmp_path / "bad.yaml"
    bad.write_text("musicgen: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_cli_error_is_one_line():
    code = (
        "from bossa_jax.errors import run_cli\n"
        "from bossa_jax.config import load_config\n"
        "run_cli(lambda argv: load_config('paper', argv) and 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "musicgen.nope=1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "musicgen.nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", code, "musicgen.nope=1", "--debug"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr
