"""BOSSA in JAX / Flax NNX (DESIGN.md): library code; the entry points are train.py, generate.py
and ``python -m bossa_jax.<command>``."""

from bossa_jax.errors import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting("bossa_jax")  # `python -m bossa_jax.<command>`: Ctrl-C while importing
