"""Arrange a lead sheet in the style of a reference recording (thin entry point; the work is in
bossa_jax.generate, whose docstring describes every option, the batch mode and the errors).

    python generate.py --leadsheet LS --audio REF --out DIR [--checkpoint DIR] [--config FILE]
        [--bars A:B] [--top-k 15] [--temperature 1.0] [--top-p P] [--seed N] [--pedal]
        [--no-render] [--soundfont SF2] [--overwrite] [key=value ...]
    python generate.py --manifest SONGS.jsonl --out DIR [same options]
"""

import sys

from bossa_jax.errors import run_cli
from bossa_jax.generate import main

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
