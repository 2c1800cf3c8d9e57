"""Safe loading of pickled checkpoints (convert/common.py)."""

import argparse

import numpy as np
import pytest
import torch

from bossa_jax.errors import CheckpointError
from convert.common import load_state_dict


def test_fairseq_style_pickle_with_numpy_scalars_loads(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": {"w": torch.ones(2, 3)},
            "args": argparse.Namespace(arch="x"),
            "optimizer_history": [{"lr_scheduler_state": {"best": np.float64(1.5)}}],
            "extra_state": {"epoch": np.int64(3)},
        },
        path,
    )
    tensors = load_state_dict(path, subkey="model")
    assert list(tensors) == ["w"] and tensors["w"].shape == (2, 3)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_disallowed_global_is_refused_not_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_state_dict(path, subkey="model")
    assert "this must never run" not in capsys.readouterr().out


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_state_dict(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_state_dict(tmp_path / "text.pt")


def test_bf16_stays_bf16_through_the_read_path(tmp_path):
    """safetensors and torch pickles keep bf16 (as ml_dtypes.bfloat16, same bits): no fp32 copy
    of the state dict is ever made; a dtype is only applied where a converter asks for one."""
    import ml_dtypes
    from safetensors.torch import save_file

    weight = torch.randn(3, 5).to(torch.bfloat16)
    state = {"w": weight, "b": torch.arange(4, dtype=torch.int64), "h": torch.ones(2).half()}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save(state, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        tensors = load_state_dict(tmp_path / name)
        assert tensors["w"].dtype == ml_dtypes.bfloat16, name
        assert tensors["h"].dtype == np.float16 and tensors["b"].dtype == np.int64, name
        np.testing.assert_array_equal(tensors["w"].astype(np.float32), weight.float().numpy())


def count_safetensors_reads(monkeypatch) -> tuple[list, list[str]]:
    """(handles opened, keys read through ``get_tensor``), recorded from here on."""
    import safetensors

    opened, reads = [], []
    real_open = safetensors.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)
            opened.append(self)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    return opened, reads


def test_tensors_are_read_on_access_one_at_a_time(tmp_path, monkeypatch):
    """Listing keys reads no tensor; each access reads that one tensor (safetensors'
    ``get_tensor``); pickles are memory-mapped."""
    from safetensors.torch import save_file

    save_file(
        {f"w{i}": torch.full((4,), float(i)) for i in range(3)}, str(tmp_path / "m.safetensors")
    )
    opened, reads = count_safetensors_reads(monkeypatch)
    tensors = load_state_dict(tmp_path / "m.safetensors")
    assert sorted(tensors) == ["w0", "w1", "w2"] and reads == []
    assert float(tensors["w1"][0]) == 1.0 and reads == ["w1"]

    mmap_flags = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        mmap_flags.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert load_state_dict(tmp_path / "m.pt")["w"].shape == (2,)
    assert mmap_flags == [True]


def test_sharded_directory_prefix_and_shapes_without_reading(tmp_path, monkeypatch):
    """An HF directory of several safetensors shards reads as one mapping; shapes come from the
    headers (no tensor read); ``prefix`` keeps only its names; every read reopens the file, so no
    handle (and none of its mapped pages) outlives the read."""
    from safetensors.torch import save_file

    save_file({"musecoco.a": torch.ones(2, 3)}, str(tmp_path / "model-00001.safetensors"))
    save_file(
        {"musecoco.b": torch.zeros(4), "other.c": torch.ones(1)}, str(tmp_path / "m2.safetensors")
    )
    opened, reads = count_safetensors_reads(monkeypatch)
    tensors = load_state_dict(tmp_path, prefix="musecoco.")
    assert sorted(tensors) == ["a", "b"]
    assert tensors.shape("a") == (2, 3) and tensors.shape("b") == (4,) and reads == []
    opened_before = len(opened)
    assert tensors["a"].sum() == 6 and tensors["a"].sum() == 6
    assert reads == ["musecoco.a"] * 2 and len(opened) == opened_before + 2
    with pytest.raises(CheckpointError, match="missing key 'c'"):
        tensors.shape("c")
    with pytest.raises(CheckpointError, match=r"m2.safetensors|prefix 'nothing\.'"):
        load_state_dict(tmp_path, prefix="nothing.")


def test_aligned_buffers_are_aliased_by_device_put():
    """Converters fill page-aligned buffers so that handing them to jax (and orbax) on CPU does
    not copy them: ``device_put`` aliases an aligned buffer (numpy's own large ones start 16
    bytes into a page and are copied), which keeps a conversion's peak near one model copy."""
    import jax
    import ml_dtypes

    from convert.common import aligned_empty

    array = aligned_empty((4, 256, 512), ml_dtypes.bfloat16)
    array[...] = 1
    assert array.ctypes.data % 4096 == 0 and array.flags.c_contiguous
    moved = jax.block_until_ready(jax.device_put(array))
    assert moved.unsafe_buffer_pointer() == array.ctypes.data
