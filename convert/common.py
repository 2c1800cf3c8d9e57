"""What every converter shares (DESIGN "Converters"): safe reading of upstream checkpoints, one
explicit name table per model, shape checks that name the key, and reports of missing and
unexpected keys.

Pickled checkpoints (``.pt``/``.bin``/``.ckpt``) are read with ``torch.load(weights_only=True)``
and only the globals in :data:`PICKLE_ALLOWLIST` (what fairseq and audiocraft pickle besides
tensors); anything else is refused with a CheckpointError, never unpickled.

Every source is read through :func:`load_state_dict`, which streams: safetensors through
``safe_open``, pickles memory-mapped (``torch.load(mmap=True)``), each tensor read in its own dtype
when a converter asks for it (:class:`LazyTensors`), never the whole state dict upcast at once.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from bossa_jax.checkpoint import zero_abstract_state
from bossa_jax.errors import CheckpointError, one_line

# The only globals a checkpoint pickle may name besides tensors: fairseq's ``args`` namespace and
# numpy scalars in its training state (e.g. the best validation loss), audiocraft's paths.
PICKLE_ALLOWLIST: tuple[Any, ...] = (
    argparse.Namespace,
    collections.OrderedDict,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    np._core.multiarray.scalar,  # how numpy scalars pickle (with their dtype)
    np.dtype,
    *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
)


def _global_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


Tensors = Mapping[str, np.ndarray]


class LazyTensors(Mapping[str, np.ndarray]):
    """Source tensors by name, each read only when asked for (and not kept): a converter holds
    one source tensor at a time besides what it builds, so peak host memory stays near one copy
    of the model (issue 9 item 4). Values keep the source dtype (bf16 stays
    ``ml_dtypes.bfloat16``); converters cast where the model asks for another.

    ``loaders`` maps each name to a function returning its array; ``shapes`` gives what is known
    without reading (file headers, mapped tensors). ``name`` (the file) starts error lines.
    :meth:`view` renames keys without reading anything; :meth:`define` adds a derived tensor,
    computed on access.
    """

    def __init__(
        self,
        loaders: Mapping[str, Callable[[], np.ndarray]],
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        name: str = "state dict",
    ):
        self._loaders = dict(loaders)
        self._shapes = dict(shapes or {})
        self.name = name

    def __getitem__(self, key: str) -> np.ndarray:
        return self._loaders[key]()

    def __contains__(self, key: object) -> bool:
        return key in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def shape(self, key: str) -> tuple[int, ...]:
        """``key``'s shape, from the header where the source has one (nothing read), else read."""
        if key not in self._loaders:
            raise CheckpointError(f"{self.name}: missing key '{key}'")
        if key not in self._shapes:
            self._shapes[key] = tuple(self[key].shape)
        return self._shapes[key]

    def view(self, names: Mapping[str, str]) -> LazyTensors:
        """A lazy mapping of new name -> ``self[old name]`` for each ``names`` item."""
        return LazyTensors(
            {new: self._loaders[old] for new, old in names.items()},
            {new: self._shapes[old] for new, old in names.items() if old in self._shapes},
            self.name,
        )

    def under(self, prefix: str) -> LazyTensors:
        """The tensors whose names start with ``prefix``, the prefix removed (e.g. ``musecoco.``
        of a stage-2 file); none there is an error naming the prefix."""
        if not prefix:
            return self
        names = {k[len(prefix) :]: k for k in self._loaders if k.startswith(prefix)}
        if not names:
            raise CheckpointError(f"{self.name}: no tensors under the prefix '{prefix}'")
        return self.view(names)

    def loader(self, key: str) -> Callable[[], np.ndarray]:
        """The function that reads ``key`` (e.g. to derive a tensor from it with :meth:`define`)."""
        return self._loaders[key]

    def define(self, key: str, compute: Callable[[], np.ndarray]) -> None:
        """Adds (or replaces) ``key`` as ``compute()``, called on each access."""
        self._loaders[key] = compute
        self._shapes.pop(key, None)


def _loader(value: Any) -> Callable[[], np.ndarray]:
    return lambda: _to_numpy(value)


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (or array-like) as numpy in its own dtype, sharing memory where it can; bf16
    goes through its int16 bits (numpy has no bf16 of its own: ``ml_dtypes.bfloat16``)."""
    if type(value).__module__.startswith("torch"):
        import torch

        value = value.detach()
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _torch_load(path: Path) -> Any:
    """A pickled checkpoint through the allowlist; tensors stay memory-mapped where the file is
    in torch's zip format (since torch 1.6), so nothing is read until a converter asks for it."""
    import torch

    try:
        with torch.serialization.safe_globals(list(PICKLE_ALLOWLIST)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "zip" not in str(err).lower():  # legacy (pre-zip) pickles cannot be mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError with long texts
        text = one_line(str(err))
        if "Unsupported global" in text or "weights_only" in text.lower():
            glob = (
                text.split("GLOBAL", 1)[-1].split(" was not")[0].strip() if "GLOBAL" in text else ""
            )
            raise CheckpointError(
                f"{path}: refusing to unpickle a disallowed object {glob}".rstrip()
                + " (only tensors and "
                + ", ".join(sorted({_global_name(g) for g in PICKLE_ALLOWLIST}))
                + " are allowed)"
            ) from err
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({text[:200]})") from err


def flatten(tree: Mapping[str, Any], prefix: str = "", name: str = "state dict") -> LazyTensors:
    """Nested state dict -> lazy dotted names -> tensors (non-tensor leaves are dropped); shapes
    come from the (possibly memory-mapped) tensors without reading them."""
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            inner = flatten(value, f"{full}.")
            loaders.update(inner._loaders)
            shapes.update(inner._shapes)
        elif hasattr(value, "shape"):
            loaders[full] = _loader(value)
            shapes[full] = tuple(value.shape)
    return LazyTensors(loaders, shapes, name)


# safetensors dtypes numpy holds itself; the others (BF16, F8_*) come through the flax backend
_NUMPY_SAFETENSORS = ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL")


def _safetensors(path: Path) -> LazyTensors:
    """A ``.safetensors`` file: names, shapes and dtypes from its header; each access opens the
    file, reads that one tensor through ``safe_open`` and closes it again, so the mapped pages of
    tensors already read do not stay resident (peak RSS near one copy of what was converted).
    bf16, which numpy cannot hold, comes through the flax backend as ``ml_dtypes.bfloat16``."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            header = {
                key: (handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape()))
                for key in handle.keys()
            }
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({one_line(str(err))[:200]})"
        ) from err

    def loader(key: str, dtype: str) -> Callable[[], np.ndarray]:
        framework = "numpy" if dtype in _NUMPY_SAFETENSORS else "flax"

        def read() -> np.ndarray:
            with safetensors.safe_open(str(path), framework=framework) as handle:
                return np.asarray(handle.get_tensor(key))

        return read

    return LazyTensors(
        {key: loader(key, dtype) for key, (dtype, _) in header.items()},
        {key: shape for key, (_, shape) in header.items()},
        str(path),
    )


def load_state_dict(
    source: str | Path | Mapping[str, Any], *, subkey: str | None = None, prefix: str = ""
) -> LazyTensors:
    """Tensors of a state dict, a ``.safetensors`` file, an HF directory (config.json +
    safetensors or pytorch_model.bin, sharded or not) or a pickled ``.pt``/``.bin`` checkpoint,
    read lazily (:class:`LazyTensors`: one tensor per access, in the source dtype, shapes from
    the headers).

    ``subkey`` picks a nested dict inside a pickle (e.g. fairseq's ``"model"``, audiocraft's
    ``"best_state"``) when present; ``prefix`` keeps only the names under it, prefix removed.
    """
    if isinstance(source, LazyTensors):
        return source.under(prefix)
    name = "state dict"
    if isinstance(source, Mapping):
        tree: Any = source
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_dir():
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin inside")
            merged = LazyTensors({}, name=name)
            for f in files:
                shard = load_state_dict(f, subkey=subkey)
                merged._loaders.update(shard._loaders)
                merged._shapes.update(shard._shapes)
            return merged.under(prefix)
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file")
        if path.suffix == ".safetensors":
            return _safetensors(path).under(prefix)
        tree = _torch_load(path)
    if subkey is not None and isinstance(tree, Mapping) and subkey in tree:
        tree = tree[subkey]
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{name}: expected a state dict, found {type(tree).__name__}")
    return flatten(tree, name=name).under(prefix)


def read_checkpoint(
    source: str | Path | Mapping[str, Any], *, subkey: str | None = None
) -> tuple[LazyTensors, Any]:
    """(tensors as :func:`load_state_dict` reads them, audiocraft's ``xp.cfg`` or None): one read
    of the file whatever its kind; audiocraft releases pickle their experiment config beside
    ``best_state``."""
    if isinstance(source, Mapping):
        return load_state_dict(source, subkey=subkey), source.get("xp.cfg")
    path = Path(source)
    if path.is_file() and path.suffix != ".safetensors" and path.stat().st_size > 0:
        tree = _torch_load(path)
        if isinstance(tree, Mapping):
            tensors = load_state_dict(tree, subkey=subkey)
            tensors.name = str(path)
            return tensors, tree.get("xp.cfg")
    return load_state_dict(path, subkey=subkey), None


def fairseq_parts(obj: Any, name: str) -> tuple[LazyTensors, dict[str, Any]] | None:
    """(lazy state dict, architecture args) when ``obj`` (an unpickled checkpoint) is a fairseq
    checkpoint dict (``model`` beside ``args`` or ``cfg``), else None; its training state
    (optimizer, meters) is never read."""
    if not isinstance(obj, Mapping) or "model" not in obj or not ("args" in obj or "cfg" in obj):
        return None
    if not isinstance(obj["model"], Mapping):
        raise CheckpointError(f"{name}: 'model' is {type(obj['model']).__name__}, not a state dict")
    if isinstance(obj.get("args"), argparse.Namespace):
        args = vars(obj["args"])
    elif isinstance(obj.get("cfg"), Mapping) and isinstance(obj["cfg"].get("model"), Mapping):
        args = dict(obj["cfg"]["model"])
    elif isinstance(obj.get("cfg"), Mapping) and isinstance(
        obj["cfg"].get("model"), argparse.Namespace
    ):
        args = vars(obj["cfg"]["model"])
    else:
        raise CheckpointError(
            f"{name}: fairseq checkpoint without 'args' (argparse.Namespace) or 'cfg.model'"
        )
    tensors = load_state_dict(obj["model"])
    tensors.name = name
    return tensors, args


def read_fairseq_checkpoint(path: str | Path) -> tuple[LazyTensors, dict[str, Any]]:
    """(lazy state dict, architecture args) of a fairseq checkpoint file; anything else refused."""
    obj = _torch_load(Path(path))
    parts = fairseq_parts(obj, str(path))
    if parts is None and isinstance(obj, Mapping) and "model" in obj:
        raise CheckpointError(
            f"{path}: fairseq checkpoint without 'args' (argparse.Namespace) or 'cfg.model'"
        )
    if parts is None:
        found = sorted(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not a fairseq checkpoint (expected a dict with 'model' and 'args'; "
            f"found {found})"
        )
    return parts


def read_hf_config(path: str | Path) -> dict[str, Any]:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config}: not valid JSON ({err})") from err


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 4096) -> np.ndarray:
    """An uninitialised array whose buffer starts on an ``align``-byte boundary. numpy's own large
    buffers start 16 bytes into a page, and ``jax.device_put`` on CPU copies a buffer that is not
    64-byte aligned; an aligned one it aliases, so a converted model is not held twice."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def param_paths(module: nnx.Module) -> dict[str, nnx.Variable]:
    """Flax parameters by dotted path (``blocks.fc1.kernel``)."""
    return {
        ".".join(str(p) for p in path): var
        for path, var in nnx.iter_graph(module)
        if isinstance(var, nnx.Param)
    }


def fill(
    module: nnx.Module,
    values: Mapping[str, np.ndarray],
    *,
    source: str,
    cast: Any = None,
) -> None:
    """Writes ``values`` (Flax dotted path -> array) into ``module``'s parameters.

    Every parameter must receive a value of exactly its shape; a mismatch names the parameter,
    the expected and the found shape; parameters left without a value are listed by name.
    ``module`` may be abstract (``nnx.eval_shape``): its other variables are given zeros.
    """
    zero_abstract_state(module)
    params = param_paths(module)
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise CheckpointError(f"{source}: converter produced unknown parameters {unknown[:8]}")
    for name, var in params.items():
        if name not in values:
            continue
        value = np.asarray(values[name])
        if value.shape != var.shape:
            raise CheckpointError(
                f"{source}: shape mismatch for '{name}': expected {tuple(var.shape)}, "
                f"found {tuple(value.shape)}"
            )
        var.set_value(np.asarray(value, dtype=cast or var.dtype))
    missing = sorted(set(params) - set(values))
    if missing:
        raise CheckpointError(f"{source}: no value for parameters {_first_eight(missing)}")


def _first_eight(keys: list[str]) -> str:
    """``keys`` for an error line: the first eight, then how many more."""
    return f"{keys[:8]}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def check_missing(tensors: Mapping[str, np.ndarray], needed: Iterable[str], *, source: str) -> None:
    """Raises naming the ``needed`` keys (in their order) that ``tensors`` lacks."""
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing keys {_first_eight(missing)}")


def check_keys(
    tensors: Mapping[str, np.ndarray],
    used: Iterable[str],
    *,
    source: str,
    ignore_prefixes: Iterable[str] = (),
    ignore_suffixes: Iterable[str] = (),
    names: Mapping[str, str] | None = None,
) -> None:
    """Raises when source keys are neither used nor deliberately ignored (by prefix/suffix).

    ``names`` maps renamed keys back to the upstream names the report should show.
    """
    used = set(used)
    names = names or {}
    ignore_prefixes, ignore_suffixes = tuple(ignore_prefixes), tuple(ignore_suffixes)
    unexpected = sorted(
        names.get(k, k)
        for k in tensors
        if k not in used and not k.startswith(ignore_prefixes) and not k.endswith(ignore_suffixes)
    )
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {_first_eight(unexpected)}")


class TensorReader:
    """Hands out source tensors by key, recording which were used, so leftovers can be reported.

    A missing key raises a CheckpointError naming it.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise CheckpointError(f"{self.source}: missing key '{key}'")
        self.used.add(key)
        return self.tensors[key]

    def check_unused(
        self, ignore_prefixes: Iterable[str] = (), ignore_suffixes: Iterable[str] = ()
    ):
        check_keys(
            self.tensors,
            self.used,
            source=self.source,
            ignore_prefixes=ignore_prefixes,
            ignore_suffixes=ignore_suffixes,
        )
