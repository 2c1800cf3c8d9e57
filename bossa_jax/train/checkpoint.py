"""Training checkpoints (DESIGN "Checkpoints"): orbax ``CheckpointManager``, async, atomic, keep N.

One checkpoint per step directory holds two items:

* ``state``: the :class:`~bossa_jax.train.step.TrainState` (update count, trainable parameters,
  optimizer state) and the run's base rng key (as raw key data), written collectively by every
  process in a multi-host run (each writes its own shards);
* ``data``: every process's data-iterator state (a JSON-able dict from grain's ``get_state()``),
  gathered to the primary process, so each process resumes its own shard of the data.

Restores go into abstract targets carrying the current shardings, so nothing is materialised on
one device first and a resumed run may use a different mesh. orbax writes each step to a temporary
directory and renames it when complete, so a crash mid-write leaves the previous checkpoint as the
latest; an existing step is never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bossa_jax.errors import CheckpointError, one_line

STATE_ITEM = "state"
DATA_ITEM = "data"


def _gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (a collective in multi-process runs)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everything, lengths.reshape(-1))
    ]


class TrainCheckpointer:
    """Keeps the last ``keep`` training checkpoints under ``directory`` (every process calls every
    method: saves and restores are collective)."""

    def __init__(self, directory: str | os.PathLike, keep: int, *, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, state: Any, rng: jax.Array, data_state: dict[str, Any] | None
    ) -> None:
        """Starts writing checkpoint ``step`` (returns before the write finishes when async).

        The caller guarantees ``state`` is good (finite loss); an existing step is never
        overwritten."""
        if step in self.manager.all_steps():
            return
        tree = {"train": state, "rng": np.asarray(jax.random.key_data(rng))}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(tree),
                    DATA_ITEM: ocp.args.JsonSave({"processes": _gather_json(data_state)}),
                }
            ),
            force=True,
        )

    def restore(
        self, step: int, abstract_state: Any, rng: jax.Array
    ) -> tuple[Any, jax.Array, dict[str, Any] | None]:
        """Restores checkpoint ``step`` into ``abstract_state`` (ShapeDtypeStructs with the
        current shardings); ``rng`` gives the key's type. Returns (state, rng, this process's
        data-iterator state)."""
        key_data = np.asarray(jax.random.key_data(rng))
        target = {
            "train": abstract_state,
            "rng": jax.ShapeDtypeStruct(
                key_data.shape, key_data.dtype, sharding=getattr(rng, "sharding", None)
            ),
        }
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardRestore(target),
                        DATA_ITEM: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as err:
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore the training state "
                f"({one_line(str(err))[:300]})"
            ) from err
        tree = restored[STATE_ITEM]
        key = jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(rng))
        processes = (restored[DATA_ITEM] or {}).get("processes", [None])
        if len(processes) != jax.process_count():
            raise CheckpointError(
                f"{self.directory}/{step}: written by {len(processes)} processes, resumed with "
                f"{jax.process_count()}; the data-iterator state cannot be split differently"
            )
        return tree["train"], key, processes[jax.process_index()]

    def wait(self) -> None:
        """Blocks until pending async writes are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
