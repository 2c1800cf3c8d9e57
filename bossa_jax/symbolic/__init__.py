"""Symbolic side of bossa-jax: MIDI, note tables, lead sheets, octuple and REMI tokens, windows."""
