"""Encode-speed probe for the symbolic hot path (used by ``bench/data_pipeline.py``).

The encoders are pure numpy; :func:`measure_encode_speed` times them on a synthetic 4-bar window
and returns windows per second. It never runs in the tests.
"""

from __future__ import annotations

import time

import numpy as np

from bossa_jax.symbolic import octuple, remi
from bossa_jax.symbolic.notes import NoteTable


def synthetic_window(
    notes_per_bar: int = 40, bars: int = 4, seed: int = 0
) -> tuple[NoteTable, NoteTable]:
    """A sorted random arrangement and lead sheet of ``bars`` 4/4 bars."""
    rng = np.random.default_rng(seed)

    def table(n: int, inst: int) -> NoteTable:
        ev = np.stack(
            [rng.integers(0, bars, n), rng.integers(0, 48, n), np.full(n, inst),
             rng.integers(36, 96, n), rng.integers(0, 40, n), rng.integers(10, 30, n),
             np.full(n, 9), np.full(n, 35)], axis=1,
        )  # fmt: skip
        return NoteTable(ev, np.zeros(n)).sorted()

    return table(notes_per_bar * bars, 0), table(notes_per_bar * bars // 4, 4)


def measure_encode_speed(repeats: int = 200, notes_per_bar: int = 40) -> dict[str, float]:
    """Windows per second for REMI encoding, the stage-1 and the stage-2 sequence."""
    arr, ls = synthetic_window(notes_per_bar)
    cases = {
        "remi_encode": lambda: remi.encode(arr),
        "octuple_encode": lambda: octuple.encode(arr),
        "stage1_sequence": lambda: octuple.stage1_sequence(arr, ls),
        "stage2_sequence": lambda: remi.stage2_sequence(arr, ls),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = repeats / (time.perf_counter() - start)
    return out


if __name__ == "__main__":
    for key, value in measure_encode_speed().items():
        print(f"{key:16s} {value:10.0f} windows/s")
