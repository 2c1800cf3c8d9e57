"""Worker for test_feature_cache: build the feature cache of the test corpus; with HANG_AFTER=n
the compute function writes a marker file and hangs once n clips are computed (the test then
SIGKILLs it). Usage: cache_worker.py CORPUS OUT SHARD_SIZE HANG_AFTER MARKER."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))
from bossa_jax.data import feature_cache as fc  # noqa: E402
from bossa_jax.data import synthetic  # noqa: E402
from tests.data.data_fixtures import load_index  # noqa: E402

corpus, out, shard_size, hang_after, marker = sys.argv[1:]
index, codes = load_index(Path(corpus))
done = 0


def compute(batch):
    global done
    if done >= int(hang_after):
        Path(marker).write_text(str(done))
        time.sleep(3600)
    done += len(batch)
    return synthetic.fake_features(batch)


fc.build_feature_cache(
    out,
    index.clips,
    codes.codes,
    compute,
    compute_id="fake16",
    shard_size=int(shard_size),
    batch_size=2,
    progress=False,
)
