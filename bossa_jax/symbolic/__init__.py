"""Symbolic side of bossa-jax (DESIGN "symbolic/"; SPEC 5, 6, 8.2, 11): no models imported here.

Main entry points::

    load_midi(path) / write_midi(score, path)          MIDI in/out; bad files -> MidiError
    read_arrangement(path) -> Song                      every track of a MIDI file
    read_leadsheet(path) -> Song                        melody (inst 0) + chords (inst 4)
    read_pop909(song_dir) / read_piast(path) -> Song    dataset sources with lead sheets
    NoteTable                                           (N, 8) octuple rows + onset seconds
    BeatGrid, midi_grid(score)                          beats/downbeats, 12 ticks per beat
    octuple.encode / stage1_sequence / decode           MusicBERT octuple ids (Q-Former)
    remi.encode / prompt / stage2_sequence / decode     MuseCoco REMI ids (stage 2, inference)
    remi.to_score, events_to_score, add_sustain_pedal   tokens back to MIDI
    segment_song(song, n_frames) -> [Window]            4-bar windows + audio clip frames
    augment / transpose                                 transposition

Command line: ``python -m bossa_jax.symbolic tokens FILE --codec remi|octuple`` and
``python -m bossa_jax.symbolic segments FILE`` (see ``__main__``).
"""

from bossa_jax.symbolic import octuple, remi
from bossa_jax.symbolic.leadsheet import (
    leadsheet_from_score,
    parse_chord,
    read_leadsheet,
    read_piast,
    read_pop909,
)
from bossa_jax.symbolic.midi import load_midi, write_midi
from bossa_jax.symbolic.notes import (
    FIELD_NAMES,
    TICKS_PER_BEAT,
    BeatGrid,
    NoteTable,
    Song,
    arrangement_from_score,
    events_to_score,
    midi_grid,
    read_arrangement,
)
from bossa_jax.symbolic.octuple import stage1_sequence
from bossa_jax.symbolic.remi import add_sustain_pedal, stage2_sequence
from bossa_jax.symbolic.segment import (
    Window,
    augment,
    clip_frames,
    draw_transposition,
    segment_song,
    transpose,
)

__all__ = [
    "FIELD_NAMES",
    "TICKS_PER_BEAT",
    "BeatGrid",
    "NoteTable",
    "Song",
    "Window",
    "add_sustain_pedal",
    "arrangement_from_score",
    "augment",
    "clip_frames",
    "draw_transposition",
    "events_to_score",
    "leadsheet_from_score",
    "load_midi",
    "midi_grid",
    "octuple",
    "parse_chord",
    "read_arrangement",
    "read_leadsheet",
    "read_piast",
    "read_pop909",
    "remi",
    "segment_song",
    "stage1_sequence",
    "stage2_sequence",
    "transpose",
    "write_midi",
]
