"""The networks of BOSSA, one file each, built only from bossa_jax.layers, and the losses they
compute (losses); nothing here imports training code (DESIGN "Layout")."""
