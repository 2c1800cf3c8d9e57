"""Worker for test_pipeline: in a fresh process, rebuild the pipeline, restore a saved iterator
state and write the next batches. Usage: restore_worker.py CORPUS OPTIONS_JSON STATE_JSON N OUT."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.data.data_fixtures import make_pipeline  # noqa: E402

corpus, options, state, count, out = sys.argv[1:]
iterator = make_pipeline(Path(corpus), **json.loads(options)).iterator()
iterator.set_state(json.loads(Path(state).read_text()))
batches = [next(iterator) for _ in range(int(count))]
np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
