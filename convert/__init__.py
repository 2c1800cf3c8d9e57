"""One converter per source checkpoint (DESIGN "Converters"): ``python -m convert.<name>``."""

from bossa_jax.errors import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting("convert")  # `python -m convert.<command>`: Ctrl-C while importing
