"""Arrange a lead sheet in the style of a reference audio clip (thin entry point).

Stage 2 (MuseCoco + LoRA, bossa_jax.models.arranger) and the jitted top-k sampler
(bossa_jax.sampling) exist; windowed arrangement of whole lead sheets and a trained model to run
(the BOSSA-mini demo checkpoint) do not yet: until they land this command says so and exits
non-zero instead of pretending.
"""

import sys

from bossa_jax.errors import BossaError, run_cli


def main(argv: list[str]) -> int:
    raise BossaError(
        "generate.py: windowed arrangement and the demo model are not built yet (stage 2 and the "
        "sampler are); available now: `python -m bossa_jax.features`, `train.py stage1|stage2`"
    )


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
