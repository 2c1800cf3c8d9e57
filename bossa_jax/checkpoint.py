"""Converted-model checkpoints: a module's parameters as an orbax checkpoint plus the config that
builds it (DESIGN "Converters", "Checkpoints"). Written atomically; restored into an abstract
target so a shape mismatch is reported by name instead of failing deep inside orbax.

Training state (optimizer, rng, data iterator) lives in ``bossa_jax.train.checkpoint``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import Mesh

from bossa_jax.config import build
from bossa_jax.errors import CheckpointError, ConfigError, one_line
from bossa_jax.outputs import atomic_output
from bossa_jax.sharding import named_shardings

M = TypeVar("M", bound=nnx.Module)
C = TypeVar("C")
PARAMS_DIR = "params"
CONFIG_FILE = "config.yaml"
# orbax writes a host array as one chunk by default and its OCDBT store gathers encoded chunks in
# memory up to its data-file size (gigabytes) before writing them: a converted model would be held
# twice. Chunks and data files of this size keep the write's extra host memory near it (issue 9:
# conversion peak <= 1.5x the file).
DATA_FILE_BYTES = 32 << 20


def save_module(
    path: str | os.PathLike,
    module: nnx.Module,
    config: dict[str, Any],
    *,
    kind: str = "checkpoint",
    overwrite: bool = False,
) -> Path:
    """Writes ``module``'s parameters and ``config`` (plain data) to directory ``path``, a ``kind``
    output that replaces only an empty folder or, with ``overwrite``, a previous ``kind``
    (bossa_jax.outputs)."""
    state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    with atomic_output(path, kind=kind, overwrite=overwrite) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        # one leaf's host copy at a time (orbax refuses a leaf above the limit): the write adds
        # about the largest parameter to the host memory, not a second copy of the model
        largest = max((leaf.nbytes for leaf in jax.tree.leaves(state)), default=0)
        handler = ocp.PyTreeCheckpointHandler(
            save_device_host_concurrent_gb=(largest + 2**20) / 1e9
        )
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(
                (tmp / PARAMS_DIR).absolute(),
                args=ocp.args.PyTreeSave(
                    state,
                    save_args=jax.tree.map(
                        lambda _: ocp.SaveArgs(chunk_byte_size=DATA_FILE_BYTES), state
                    ),
                    ocdbt_target_data_file_size=DATA_FILE_BYTES,
                ),
            )
    return Path(path)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{path}: not a bossa-jax checkpoint (no {CONFIG_FILE})")
    return yaml.safe_load(config.read_text()) or {}


def read_section(path: str | os.PathLike, section: str, cls: type[C]) -> C:
    """The config dataclass ``cls`` stored under ``section`` of a checkpoint's config, built and
    validated; anything missing or invalid is a CheckpointError naming the path and the key."""
    stored = read_config(path).get(section)
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: no '{section}' section in its {CONFIG_FILE}")
    try:
        cfg = build(cls, stored, section)
        cfg.validate(section)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return cfg


def load_module(path: str | os.PathLike, ctor: Callable[[], M], *, mesh: Mesh | None = None) -> M:
    """Restores parameters saved by :func:`save_module` into the module ``ctor()`` builds.

    The module is created abstractly (no allocation); shapes are compared by name first. With
    ``mesh`` (call inside ``sharding.use_mesh``, whose rules give each parameter's layout), every
    parameter is restored straight into its NamedSharding: each device reads only its shards and
    no whole parameter lands on one device first (issue 9 item 4).
    """
    path = Path(path)
    params_dir = (path / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{path}: not a bossa-jax checkpoint (no {PARAMS_DIR}/)")
    abstract = nnx.eval_shape(ctor)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = nnx.to_pure_dict(params)
    if mesh is not None:
        target = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            target,
            nnx.to_pure_dict(named_shardings(params, mesh)),
        )
    target_str = _str_keys(target)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(params_dir)
            stored = getattr(meta, "item_metadata", meta)
            stored = getattr(stored, "tree", stored)
            _compare_shapes(target_str, stored, str(path))
            restored = _like_keys(target, ckptr.restore(params_dir, target_str))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"{path}: cannot restore parameters ({one_line(str(err))[:300]})"
            ) from err
    nnx.replace_by_pure_dict(params, restored)
    module = nnx.merge(graphdef, params, rest)
    zero_abstract_state(module)
    return module


def zero_abstract_state(module: nnx.Module) -> None:
    """Gives zeros to the non-parameter variables of an abstract module (``nnx.eval_shape``)
    that still hold only a shape (e.g. caches and statistics no checkpoint stores)."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and not isinstance(var, nnx.Param):
            value = var.get_value()
            if isinstance(value, jax.ShapeDtypeStruct):
                var.set_value(jax.numpy.zeros(value.shape, value.dtype))


def _str_keys(tree: Any) -> Any:
    """orbax stores every dict key as a string; ``nnx.List`` indices are ints in pure dicts."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _like_keys(template: Any, tree: Any) -> Any:
    """``tree`` (string keys) with the keys of ``template`` (ints where those were ints)."""
    if isinstance(template, dict):
        return {k: _like_keys(v, tree[str(k)]) for k, v in template.items()}
    return tree


def _compare_shapes(target: Any, stored: Any, source: str) -> None:
    flat_t = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    flat_s = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    missing = sorted(set(flat_t) - set(flat_s))
    unexpected = sorted(set(flat_s) - set(flat_t))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: parameters missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for key, t in flat_t.items():
        s_shape = tuple(getattr(flat_s[key], "shape", np.shape(flat_s[key])))
        if tuple(t.shape) != s_shape:
            raise CheckpointError(
                f"{source}: shape mismatch for '{key}': model expects "
                f"{tuple(t.shape)}, checkpoint has {s_shape}"
            )
