"""Arrange a lead sheet in the style of a reference audio clip (thin entry point).

Stage 2 (MuseCoco + LoRA) and the windowed top-k sampler are not built yet: until they land this
command says so and exits non-zero instead of pretending.
"""

import sys

from bossa_jax.errors import BossaError, run_cli


def main(argv: list[str]) -> int:
    raise BossaError(
        "generate.py: arrangement needs stage 2 (MuseCoco + LoRA) and the sampler, which are not "
        "built yet; available now: `python -m bossa_jax.features` (audio -> MusicGen features)"
    )


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
