"""Train BOSSA stage 1 / stage 2 (thin entry point).

The training loops are not built yet: until they land this command says so and exits non-zero.
"""

import sys

from bossa_jax.errors import BossaError, run_cli


def main(argv: list[str]) -> int:
    raise BossaError("train.py: stage-1 and stage-2 training are not built yet")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
