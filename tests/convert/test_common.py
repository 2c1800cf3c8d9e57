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
