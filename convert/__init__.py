"""One converter per source checkpoint (DESIGN "Converters"): ``python -m convert.<name>``."""
