"""Released BOSSA checkpoints (``bossa_stage1.pt``, ``bossa_stage2.pt``) -> bossa-jax
``Stage1Model`` / ``Stage2Model`` (SPEC 7; DESIGN "Converters").

    python -m convert.bossa bossa_stage1.pt OUT --stage 1 [--config paper] [--no-musicgen]
    python -m convert.bossa bossa_stage2.pt OUT --stage 2 [--config paper] [--no-musicgen]
    python -m convert.bossa STAGE2_CHECKPOINT OUT.pt --stage 2 --export-official

The file is the plain ``state_dict()`` of the official ``Blip2Qformer`` (SPEC 7 "Key prefixes"):

* ``musicgen_decoder.decoder.*``: the frozen MusicGen decoder (25 blocks), read with the HF name
  table of ``convert/musicgen.py`` (its cross-attention weights add exactly zero and are skipped,
  SPEC 1.2); ``musicgen_enc_to_dec_proj.*`` only projects the all-zero text state and is skipped.
* ``Qformer.*`` and ``query_tokens``: the Q-Former, through ``convert/musicbert.py``'s
  official-name table; ``Qformer.bert.embeddings.position_ids`` is a buffer and
  ``Qformer.cls.predictions.bias`` the same tensor as ``...decoder.bias`` (checked, then skipped).
* ``layer_norm``, ``audio_proj``, ``symbo_proj``, ``binary_head``, ``temp``: the audio LayerNorm and
  the heads; the projection width (256 in the paper) is read off ``audio_proj.weight``. The LAVIS
  names the official loaders also accept (``ln_audio``, ``vision_proj``, ``text_proj``,
  ``itm_head``) are renamed first, as ``Blip2Musecoco`` does (SPEC 4.1).

Every missing key and every key neither used nor deliberately skipped is reported by name; a wrong
shape names the official key. ``--no-musicgen`` builds the model without MusicGen (features from a
cache) and skips the ``musicgen_decoder.`` keys.

Stage 2 (``Blip2Musecoco.state_dict()``): ``blip2qformer.`` + the stage-1 names minus the modules
stage 2 deletes (SPEC 4.1: the query-only Q-Former, ``blip2qformer.layer_norm`` / ``ln_audio``,
``blip2qformer.musicgen_decoder.*``), ``musecoco.`` + the HF-port MuseCoco names with
``...self_attn.lora_{q,k,v}.lora_{A,B}`` (``convert/musecoco.py``'s table) and
``musecoco_proj.{weight,bias}``. The whole file is read into host memory (not streamed yet).

``--export-official`` goes the other way (:func:`to_official_stage2`): a bossa-jax stage-2
checkpoint (``save_stage2``, a run's export, or this converter's output) is written back in that
layout with ``torch.save`` (``.pt``) or as ``.safetensors``, so the official code can load our
weights. Every tensor the converter reads comes back under its official name, in the model's
dtype; ``blip2qformer.Qformer.bert.embeddings.position_ids`` is rebuilt (arange) and
``musecoco.decoder.embed_positions._float_tensor`` (fairseq's uninitialised dtype buffer) written
as one zero. The frozen MusicGen, when the checkpoint has it, is written under
``blip2qformer.musicgen_decoder.decoder.`` with the self-attention names this converter reads; its
cross-attention weights and ``musicgen_enc_to_dec_proj`` (skipped on import: they act only on the
all-zero text state, SPEC 1.2) are not kept by bossa-jax and so are not written: load such a file
with ``load_state_dict(strict=False)`` or leave MusicGen out (features mode).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from bossa_jax.cli import ArgumentParser, UsageError, add_output_options
from bossa_jax.config import Config, QFormerConfig, load_config
from bossa_jax.errors import CheckpointError, run_cli
from bossa_jax.models.arranger import CHECKPOINT_KIND as STAGE2_CHECKPOINT_KIND
from bossa_jax.models.arranger import Stage2Model, load_stage2, save_stage2
from bossa_jax.models.bossa import CHECKPOINT_KIND, Stage1Model, save_stage1
from bossa_jax.outputs import atomic_output, check_output
from convert.common import (
    LazyTensors,
    TensorReader,
    check_missing,
    fill,
    load_state_dict,
    param_paths,
)
from convert.musicbert import Rule, _same, _transpose, official_qformer_rules, values_from_official
from convert.musicgen import HF_BLOCK_TABLE, OFFICIAL_PREFIX, hf_to_flax

# LAVIS-style names -> official BOSSA names (Blip2Musecoco's renames, SPEC 4.1 / 7)
LAVIS_ALIASES: tuple[tuple[str, str], ...] = (
    ("ln_audio.", "layer_norm."),
    ("vision_proj.", "audio_proj."),
    ("text_proj.", "symbo_proj."),
    ("itm_head.", "binary_head."),
)
MUSICGEN_PREFIX = OFFICIAL_PREFIX.split(".")[0] + "."  # musicgen_decoder.
SKIPPED_PREFIXES = ("musicgen_enc_to_dec_proj.",)
SKIPPED_KEYS = ("Qformer.bert.embeddings.position_ids",)
TIED_BIAS = ("Qformer.cls.predictions.bias", "Qformer.cls.predictions.decoder.bias")


def official_name(key: str) -> str:
    """A stage-1 key with the LAVIS aliases replaced by the official names."""
    for old, new in LAVIS_ALIASES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def stage1_rules(cfg: Config) -> dict[str, Rule]:
    """``Stage1Model`` parameter path (without MusicGen) -> (official key, transform)."""
    rules = {
        f"qformer.{path}": rule
        for path, rule in official_qformer_rules(
            cfg.qformer, prefix="Qformer.", query_tokens="query_tokens"
        ).items()
    }
    rules["audio_layer_norm.scale"] = ("layer_norm.weight", _same)
    rules["audio_layer_norm.bias"] = ("layer_norm.bias", _same)
    for head in ("audio_proj", "symbo_proj", "binary_head"):
        rules[f"{head}.kernel"] = (f"{head}.weight", _transpose)
        rules[f"{head}.bias"] = (f"{head}.bias", _same)
    rules["temp"] = ("temp", _same)
    return rules


def musicgen_keys(cfg: Config) -> list[str]:
    """The official keys the kept MusicGen blocks need (for the missing-key report)."""
    prefix = OFFICIAL_PREFIX
    keys = [f"{prefix}embed_tokens.{q}.weight" for q in range(cfg.musicgen.num_codebooks)]
    keys += [
        f"{prefix}layers.{i}.{name}"
        for i in range(cfg.musicgen.keep_layers)
        for _, name, _ in HF_BLOCK_TABLE
    ]
    return keys + [f"{prefix}layer_norm.weight", f"{prefix}layer_norm.bias"]


def _abstract_stage1(cfg: Config, with_musicgen: bool, proj_dim: int) -> Stage1Model:
    return nnx.eval_shape(
        lambda: Stage1Model(
            cfg.qformer,
            cfg.musicgen if with_musicgen else None,
            proj_dim=proj_dim,
            rngs=nnx.Rngs(0),
        )
    )


def _official_names(tensors: LazyTensors, source: str) -> LazyTensors:
    """``tensors`` under the official names (LAVIS aliases renamed), nothing read."""
    names: dict[str, str] = {}
    for key in tensors:
        new = official_name(key)
        if new in names:
            raise CheckpointError(f"{source}: both '{key}' and its official name '{new}' present")
        names[new] = key
    return tensors.view(names)


def projection_width(tensors: Mapping[str, np.ndarray], *, source: str) -> int:
    """The ITC embedding width, read off ``audio_proj.weight`` (out, in); ``symbo_proj`` is then
    checked against it like every other shape."""
    check_missing(tensors, ["audio_proj.weight"], source=source)
    return int(tensors["audio_proj.weight"].shape[0])


def stage1_values(
    tensors: Mapping[str, np.ndarray], cfg: Config, *, with_musicgen: bool, source: str
) -> dict[str, np.ndarray]:
    """Official stage-1 tensors -> ``Stage1Model`` dotted paths -> values (Flax orientation)."""
    renamed = _official_names(load_state_dict(tensors), source)
    rules = stage1_rules(cfg)
    needed = [key for key, _ in rules.values()] + (musicgen_keys(cfg) if with_musicgen else [])
    check_missing(renamed, needed, source=source)

    reader = TensorReader(renamed, source)
    abstract = _abstract_stage1(cfg, with_musicgen, projection_width(renamed, source=source))
    values = values_from_official(abstract, reader, rules, source=source)
    if TIED_BIAS[0] in renamed:  # HF registers the LM-head bias under two names
        if not np.array_equal(renamed[TIED_BIAS[0]], renamed[TIED_BIAS[1]]):
            raise CheckpointError(f"{source}: '{TIED_BIAS[0]}' differs from '{TIED_BIAS[1]}'")
        reader.used.add(TIED_BIAS[0])

    if with_musicgen:  # the official prefix is one of convert.musicgen's HF layouts
        musicgen = hf_to_flax(renamed, cfg.musicgen, source=source)
        values.update({f"musicgen.{path}": value for path, value in musicgen.items()})

    reader.check_unused(
        ignore_prefixes=SKIPPED_PREFIXES + (MUSICGEN_PREFIX,),
        ignore_suffixes=SKIPPED_KEYS,
    )
    return values


def convert_stage1(
    source: str | Path | Mapping[str, Any],
    cfg: Config | None = None,
    *,
    with_musicgen: bool = True,
) -> Stage1Model:
    """Builds a :class:`Stage1Model` holding a released/official stage-1 state dict.

    ``cfg`` gives the sizes (default: the paper config) except the projection width, which the
    checkpoint's ``audio_proj`` holds; every shape is checked against them.
    """
    cfg = cfg or load_config("paper")
    tensors = load_state_dict(source)
    name = tensors.name
    values = stage1_values(tensors, cfg, with_musicgen=with_musicgen, source=name)
    model = _abstract_stage1(
        cfg, with_musicgen, projection_width(_official_names(tensors, name), source=name)
    )
    fill(model, values, source=name)
    return model


# -- stage 2 (SPEC 4.1, 7): the query-only Q-Former, projection and MuseCoco with LoRA ----------
STAGE2_QFORMER_PREFIX = "blip2qformer."
STAGE2_MUSECOCO_PREFIX = "musecoco."
# the stage-1 parts a stage-2 file still holds but Stage2Model does not use (features mode)
STAGE2_SKIPPED_PREFIXES = tuple(
    STAGE2_QFORMER_PREFIX + p for p in (MUSICGEN_PREFIX, *SKIPPED_PREFIXES)
)


def stage2_rules(qformer: QFormerConfig) -> dict[str, Rule]:
    """``Stage2Model`` parameter path (Q-Former side and projection) -> (official key,
    transform): ``blip2qformer.`` + the stage-1 names minus the modules stage 2 deletes."""
    query_only = dataclasses.replace(qformer, symbolic_branch=False)
    prefix = STAGE2_QFORMER_PREFIX
    rules = {
        f"qformer.{path}": rule
        for path, rule in official_qformer_rules(
            query_only, prefix=f"{prefix}Qformer.", query_tokens=f"{prefix}query_tokens"
        ).items()
    }
    rules["audio_layer_norm.scale"] = (f"{prefix}layer_norm.weight", _same)
    rules["audio_layer_norm.bias"] = (f"{prefix}layer_norm.bias", _same)
    rules["musecoco_proj.kernel"] = ("musecoco_proj.weight", _transpose)
    rules["musecoco_proj.bias"] = ("musecoco_proj.bias", _same)
    return rules


def stage2_values(
    tensors: Mapping[str, np.ndarray], model: Any, *, source: str
) -> dict[str, np.ndarray]:
    """Official stage-2 tensors -> values of ``model`` (an abstract ``Stage2Model``; its MusicGen,
    when it has one, from ``blip2qformer.musicgen_decoder.*``) by dotted path.
    ``blip2qformer.ln_audio`` is renamed as the notebook does."""
    from convert.musecoco import source_to_flax

    tensors = load_state_dict(tensors)
    ln_audio, layer_norm = (f"{STAGE2_QFORMER_PREFIX}{n}." for n in ("ln_audio", "layer_norm"))
    renamed = tensors.view({key.replace(ln_audio, layer_norm): key for key in tensors})
    reader = TensorReader(renamed, source)
    rules = stage2_rules(model.cfg)
    check_missing(renamed, [key for key, _ in rules.values()], source=source)
    values = values_from_official(model, reader, rules, source=source)
    musecoco = renamed.under(STAGE2_MUSECOCO_PREFIX)
    musecoco.name = f"{source} [{STAGE2_MUSECOCO_PREFIX}*]"
    for path, value in source_to_flax(musecoco, model.musecoco).items():
        values[f"musecoco.{path}"] = value
    if model.musicgen is not None:  # under the stage-1 prefix, one of convert.musicgen's layouts
        prefix = STAGE2_QFORMER_PREFIX + MUSICGEN_PREFIX
        stage1_names = {k[len(STAGE2_QFORMER_PREFIX) :]: k for k in renamed if k.startswith(prefix)}
        musicgen = hf_to_flax(renamed.view(stage1_names), model.musicgen.cfg, source=source)
        values.update({f"musicgen.{path}": value for path, value in musicgen.items()})
    reader.check_unused(
        ignore_prefixes=STAGE2_SKIPPED_PREFIXES + (STAGE2_MUSECOCO_PREFIX,),
        ignore_suffixes=SKIPPED_KEYS,
    )
    return values


def convert_stage2(
    source: str | Path | Mapping[str, Any],
    cfg: Config | None = None,
    *,
    with_musicgen: bool = True,
) -> Stage2Model:
    """Builds a :class:`Stage2Model` holding a released/official stage-2 state dict
    (``bossa_stage2.pt``); ``cfg`` gives the sizes (default: paper), every shape is checked."""
    cfg = cfg or load_config("paper")
    name = "state dict" if isinstance(source, Mapping) else str(source)
    tensors = load_state_dict(source)
    musicgen = cfg.musicgen if with_musicgen else None
    model = nnx.eval_shape(
        lambda: Stage2Model(cfg.qformer, cfg.musecoco, musicgen, rngs=nnx.Rngs(0))
    )
    fill(model, stage2_values(tensors, model, source=name), source=name)
    return model


# -- export: a bossa-jax stage-2 model -> the released bossa_stage2.pt layout ---------------------
OFFICIAL_EXPORT_KIND = "official BOSSA stage-2 state dict"
EXPORT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
POSITION_IDS = f"{STAGE2_QFORMER_PREFIX}Qformer.bert.embeddings.position_ids"
FLOAT_TENSOR = f"{STAGE2_MUSECOCO_PREFIX}decoder.embed_positions._float_tensor"


def to_official_stage2(model: Stage2Model) -> dict[str, np.ndarray]:
    """``model``'s parameters under the official stage-2 names (SPEC 7; the inverse of
    :func:`stage2_values`): the Q-Former side through :func:`stage2_rules` (kernels transposed
    back to torch's (out, in)), MuseCoco through ``convert.musecoco.to_hf_state_dict`` under
    ``musecoco.`` (LoRA as ``lora_{q,k,v}.lora_{A,B}``), MusicGen (when present) through
    ``convert.musicgen.to_hf_state_dict`` under ``blip2qformer.musicgen_decoder.decoder.``."""
    from convert.musecoco import to_hf_state_dict as musecoco_state_dict
    from convert.musicgen import to_hf_state_dict as musicgen_state_dict

    params = param_paths(model)
    out: dict[str, np.ndarray] = {}
    for path, (key, transform) in stage2_rules(model.cfg).items():
        if transform not in (_same, _transpose):  # both are their own inverse
            raise AssertionError(f"no inverse for the transform of '{key}'")
        out[key] = np.ascontiguousarray(transform(np.asarray(params[path][...])))
    out[POSITION_IDS] = np.arange(model.cfg.max_position_embeddings, dtype=np.int64)[None]
    for key, value in musecoco_state_dict(model.musecoco).items():
        out[STAGE2_MUSECOCO_PREFIX + key] = value
    out[FLOAT_TENSOR] = np.zeros(1, np.float32)
    if model.musicgen is not None:
        prefix = STAGE2_QFORMER_PREFIX + OFFICIAL_PREFIX
        out.update(musicgen_state_dict(model.musicgen, prefix=prefix))
    return out


def write_state_dict(path: str | Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Writes ``tensors`` atomically: ``.safetensors`` with safetensors, else ``torch.save`` of a
    plain dict of tensors (what ``torch.load(weights_only=True)`` reads back)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        else:
            import torch

            def as_torch(value: np.ndarray) -> torch.Tensor:
                if value.dtype == ml_dtypes.bfloat16:  # numpy has no bf16: through its bits
                    return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
                return torch.from_numpy(np.ascontiguousarray(value))

            # the arrays are read-only views of the model's buffers; torch.save only reads
            # them, so they are wrapped as they are instead of copied (a second model in memory)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                torch.save({k: as_torch(v) for k, v in tensors.items()}, tmp)
    return path


def export_official(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """A bossa-jax stage-2 checkpoint -> ``out`` (``.pt`` or ``.safetensors``) in the released
    ``bossa_stage2.pt`` layout (see the module docstring)."""
    out = Path(out)
    if out.suffix not in EXPORT_SUFFIXES:
        raise UsageError(
            f"{out}: give a file name ending in {', '.join(EXPORT_SUFFIXES)} for the export"
        )
    check_output(out, OFFICIAL_EXPORT_KIND, folder=False, overwrite=overwrite, sources=[source])
    model = load_stage2(source)
    return write_state_dict(out, to_official_stage2(model))


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m convert.bossa",
        description="Official BOSSA checkpoint (.pt) -> bossa-jax Stage1Model / Stage2Model "
        "(SPEC 7).",
    )
    parser.add_argument(
        "source",
        help="official file, e.g. bossa_stage1.pt or bossa_stage2.pt (with --export-official: "
        "a bossa-jax stage-2 checkpoint)",
    )
    parser.add_argument(
        "output",
        help="output directory (bossa-jax checkpoint; with --export-official: a .pt or "
        ".safetensors file)",
    )
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True, help="checkpoint stage")
    parser.add_argument("--config", default="paper", help="config giving the model sizes")
    parser.add_argument(
        "--no-musicgen", action="store_true", help="leave MusicGen out (features from a cache)"
    )
    parser.add_argument(
        "--export-official",
        action="store_true",
        help="the other way: a bossa-jax stage-2 checkpoint -> the released bossa_stage2.pt layout",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.export_official:
        if args.stage != 2:
            raise UsageError("--export-official writes the stage-2 layout: give --stage 2")
        if args.overrides or args.no_musicgen:
            raise UsageError(
                "--export-official takes the sizes from the checkpoint: no overrides or "
                "--no-musicgen"
            )
        out = export_official(args.source, args.output, overwrite=args.overwrite)
        print(f"wrote {out}: the official stage-2 layout (blip2qformer., musecoco., musecoco_proj)")
        return 0
    kind = CHECKPOINT_KIND if args.stage == 1 else STAGE2_CHECKPOINT_KIND
    check_output(args.output, kind, folder=True, overwrite=args.overwrite, sources=[args.source])
    cfg = load_config(args.config, args.overrides)
    if args.stage == 2:
        arranger = convert_stage2(args.source, cfg, with_musicgen=not args.no_musicgen)
        save_stage2(args.output, arranger, overwrite=args.overwrite)
        m = cfg.musecoco
        print(
            f"wrote {args.output}: stage-2 query-only Q-Former, projection "
            f"{cfg.qformer.hidden_size} -> {m.hidden_size}, MuseCoco {m.num_hidden_layers}x"
            f"{m.hidden_size} with LoRA r{m.lora_rank}"
            + ("" if args.no_musicgen else f", MusicGen {cfg.musicgen.keep_layers} blocks")
        )
        return 0
    model = convert_stage1(args.source, cfg, with_musicgen=not args.no_musicgen)
    save_stage1(args.output, model, overwrite=args.overwrite)
    q = cfg.qformer
    print(
        f"wrote {args.output}: stage-1 Q-Former {q.num_hidden_layers}x{q.hidden_size}, "
        f"{q.num_query_tokens} queries, temp {float(model.temp[...]):.4f}"
        + ("" if args.no_musicgen else f", MusicGen {cfg.musicgen.keep_layers} blocks")
        + f" ({dataclasses.asdict(q)['vocab_size']}-id octuple vocabulary)"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
