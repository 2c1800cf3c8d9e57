"""Configs: includes, overrides, and errors that name the key (issue 2 item 2)."""

import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml

from bossa_jax.config import (
    CONFIG_DIR,
    Config,
    Section,
    load_config,
    official_options,
    parse_overrides,
    read_yaml,
)
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
    with pytest.raises(ConfigError, match="include cycle loop.yaml -> loop.yaml"):
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


# --- issue 7 item 4: every bad config is one line naming the key or the file -------------------


def _one_line_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "override, key, says",
    [
        ("musicgen.num_attention_heads=0", "musicgen.num_attention_heads", "> 0"),
        ("qformer.num_attention_heads=0", "qformer.num_attention_heads", "> 0"),
        ("musicgen.ffn_dim=-64", "musicgen.ffn_dim", "> 0"),
        ("encodec.sampling_rate=0", "encodec.sampling_rate", "> 0"),
        ("qformer.hidden_size=-32", "qformer.hidden_size", "> 0"),
        ("audio.min_seconds=-1", "audio.min_seconds", ">= 0"),
        ("musicgen.max_position_embeddings=-5", "musicgen.max_position_embeddings", "> 0"),
        ("musicgen.layer_norm_eps=nan", "musicgen.layer_norm_eps", "> 0"),
        ("train.optim.lr=inf", "train.optim.lr", "> 0"),
        ("train.optim.betas=[0.9, 1.0]", "train.optim.betas[1]", "[0, 1)"),
        ("train.optim.grad_clip_norm=0", "train.optim.grad_clip_norm", "> 0"),
        ("qformer.hidden_dropout=1.0", "qformer.hidden_dropout", "[0, 1)"),
        ("encodec.upsampling_ratios=[8, 0]", "encodec.upsampling_ratios[1]", "> 0"),
        ("mesh.shape.fsdp=-2", "mesh.shape.fsdp", "-1"),
        ("train.seed=-1", "train.seed", "0..2**32-1"),
        ("data.prefetch=-1", "data.prefetch", ">= 0"),
        ("stage1.field_mean=mean", "stage1.field_mean", "'valid', 'official'"),
    ],
)
def test_every_size_count_rate_is_checked_at_load(override, key, says):
    message = _one_line_error("tiny", [override])
    assert f"'{key}'" in message and says in message


def test_every_numeric_field_declares_its_rule():
    """A new numeric config field without a rule (``option(default, CHECK)``) fails here."""

    def numeric(tp) -> bool:
        if tp in (int, float):
            return True
        return any(numeric(a) for a in typing.get_args(tp) if a is not Ellipsis)

    missing = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            tp, key = hints[field.name], f"{prefix}{field.name}"
            if dataclasses.is_dataclass(tp):
                assert issubclass(tp, Section), key
                walk(tp, f"{key}.")
            elif numeric(tp) and field.metadata.get("check") is None:
                missing.append(key)

    walk(Config, "")
    assert not missing, f"numeric config fields without a rule: {missing}"


@pytest.mark.parametrize(
    "override, value",
    [
        ("train.optim.lr=5e-4", 5e-4),
        ("train.optim.lr=1E-3", 1e-3),
        ("train.optim.lr=2", 2.0),
        ("train.optim.lr=1_0e-5", 1e-4),
    ],
)
def test_float_fields_take_what_python_float_takes(override, value):
    assert load_config("tiny", [override]).train.optim.lr == value


def test_float_without_a_dot_in_a_file(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("include: %s\ntrain:\n  optim:\n    lr: 5e-4\n" % (CONFIG_DIR / "tiny.yaml"))
    assert load_config(path).train.optim.lr == 5e-4


@pytest.mark.parametrize(
    "override, key",
    [
        ("qformer.hidden_size=[1,", "qformer.hidden_size"),
        ("train.optim.lr=1e-4x", "train.optim.lr"),
        ("train.optim.betas=[0.9, 0.99", "train.optim.betas"),
        ("mesh.shape.data={", "mesh.shape.data"),
    ],
)
def test_unparsable_override_names_the_key(override, key):
    assert f"'{key}'" in _one_line_error("tiny", [override])


def test_string_fields_take_plain_text():
    cfg = load_config(
        "tiny", ["data.data_dir=[odd", "name=123", "train.out_dir=runs/a: b", "data.codes_dir="]
    )
    assert (cfg.data.data_dir, cfg.name, cfg.train.out_dir) == ("[odd", "123", "runs/a: b")
    assert cfg.data.codes_dir == ""
    assert load_config("tiny", ["name='quoted'"]).name == "quoted"


@pytest.mark.parametrize(
    "text, says",
    [
        ("include: 5\n", "'include' must be a file name"),
        ("include:\n", "'include' must be a file name"),
        ("include: []\n", "'include' must be a file name"),
        ("include: [tiny.yaml, 7]\n", "'include' entry 7"),
        ("include: nope.yaml\n", "config file not found"),
        ("- a\n- b\n", "mapping at the top level"),
        ("musicgen: {hidden_size: 1\n", "not valid YAML (line 2, column 1"),
    ],
)
def test_bad_file_contents_name_the_file(tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    message = _one_line_error(path)
    assert says in message and str(tmp_path) in message


def test_bad_paths_name_the_file(tmp_path):
    assert "is a directory" in _one_line_error(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _one_line_error(latin) and "latin.yaml" in _one_line_error(latin)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("include: b.yaml\n")
    b.write_text("include: [a.yaml]\n")
    message = _one_line_error(a)
    assert "include cycle a.yaml -> b.yaml -> a.yaml" in message


def test_debug_keeps_the_cause(tmp_path):
    """``--debug`` shows the chained original exception (issue 8 item 4e); normally one line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("musicgen: [1, 2\n")
    code = (
        "import sys\n"
        "from bossa_jax.errors import run_cli\n"
        "from bossa_jax.config import load_config\n"
        "run_cli(lambda argv: load_config(argv[0]) and 0)\n"
    )
    run = [sys.executable, "-c", code, str(bad)]
    plain = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1
    debug = subprocess.run(run + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2
    assert "yaml.parser.ParserError" in debug.stderr
    assert "direct cause of the following exception" in debug.stderr


# --- issue 8 item 4b: configs/official.yaml reproduces the official code -----------------------


def test_official_preset_sets_every_official_option():
    """Every field that selects official behaviour (declared with ``official=``) is set in
    official.yaml itself, to its official value; a new option without an entry fails here."""
    options = official_options()
    assert {"stage1.field_mean", "data.keep_eos", "data.clamp_clips"} <= set(options)
    raw = read_yaml(CONFIG_DIR / "official.yaml")
    text = yaml.safe_load((CONFIG_DIR / "official.yaml").read_text())
    cfg = load_config("official")
    for key, value in options.items():
        node = text
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"official.yaml does not set {key}"
            node = node[part]
        assert node == value, key
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value, key
    assert raw["name"] == "official" and cfg.qformer == load_config("paper").qformer
    # every choice that offers an "official" value is declared as an official option
    for cls in (Config, *_sections(Config)):
        for field in dataclasses.fields(cls):
            check = field.metadata.get("check")
            if check is not None and "'official'" in check.says:
                assert "official" in field.metadata, f"{cls.__name__}.{field.name}"


def _sections(cls):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield hints[field.name]
            yield from _sections(hints[field.name])


@pytest.mark.parametrize("key", ["data_dir", "audio_input", "synthetic_songs", "keep_eos"])
def test_moved_data_keys_name_their_new_place(tmp_path, key):
    """The data settings both stages share moved from ``stage1`` to ``data`` (issue 9): an old
    key, in a file or an override, names its new place."""
    path = tmp_path / "old.yaml"
    path.write_text(f"include: {CONFIG_DIR / 'tiny.yaml'}\nstage1:\n  {key}: x\n")
    expected = f"config key 'stage1.{key}' moved to 'data.{key}'"
    assert _one_line_error(path) == expected
    assert _one_line_error("tiny", [f"stage1.{key}=[x"]) == expected
    # the stage-specific settings stay where they were
    assert load_config("tiny", ["stage1.eval_batches=3"]).stage1.eval_batches == 3
