"""A tiny on-disk corpus shared by the data tests and their subprocess workers.

3 POP909-layout songs of 16 bars (6 windows each) with quiet WAV audio, their pseudo-EnCodec codes
store, and a pipeline builder, so a worker process rebuilds exactly the pipeline of the test.
"""

from __future__ import annotations

from pathlib import Path

from bossa_jax.data import feature_cache as fc
from bossa_jax.data import pipeline as pl
from bossa_jax.data import readers, synthetic

SONGS = ("001", "002", "003")
BARS = 16


def write_corpus(root: Path) -> Path:
    """Writes songs, audio and the codes store under ``root`` (idempotent); returns ``root``."""
    root = Path(root)
    if (root / "codes" / fc.MANIFEST).is_file():
        return root
    synthetic.write_pop909_corpus(root, len(SONGS), bars=BARS, compute_id="fake")
    return root


def load_index(root: Path) -> tuple[pl.CorpusIndex, fc.CodesStore]:
    records, _ = readers.read_songs(readers.pop909_sources(root / "pop909", root / "audio"))
    codes = fc.CodesStore(root / "codes")
    return pl.build_index(records, codes), codes


def make_pipeline(root: Path, **options) -> pl.Pipeline:
    index, codes = load_index(Path(root))
    options.setdefault("global_batch_size", 4)
    options.setdefault("num_threads", 2)
    return pl.Pipeline(index, pl.AudioSource(index, codes=codes), pl.PipelineOptions(**options))
