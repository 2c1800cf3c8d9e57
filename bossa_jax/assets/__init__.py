"""Built-in demo assets for the README quick start (issue 2); ``make_assets.py`` regenerates them.

* ``DEMO_LEADSHEET``: a 16-bar two-track lead sheet (track 0 melody, track 1 block chords), 4/4,
  112 bpm, an original tune.
* ``DEMO_STYLE``: about 26 s of original music (piano, bass, strings, drums) at 32 kHz mono, Ogg
  Vorbis: a style reference, and real music for the EnCodec parity test.
* ``DEMO_STYLE_MIDI``: the score that ``DEMO_STYLE`` was rendered from.
* ``DEMO_MODEL``: the shipped BOSSA-mini stage-2 model (``python train.py mini``; a stage-2
  checkpoint with its ``run_config.yaml``; how it was made: ``demo_model/NOTE.md``).
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEMO_LEADSHEET = ASSETS_DIR / "demo_leadsheet.mid"
DEMO_STYLE = ASSETS_DIR / "demo_style.ogg"
DEMO_STYLE_MIDI = ASSETS_DIR / "demo_style.mid"
DEMO_MODEL = ASSETS_DIR / "demo_model"
