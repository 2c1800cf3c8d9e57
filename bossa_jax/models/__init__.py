"""The networks of BOSSA, one file each, built only from bossa_jax.layers (DESIGN "Layout")."""
