"""The config overrides that switch a test config to the ``mel`` audio front end (issue 11, item 2),
shared by the mel, arrangement and generate tests."""

from __future__ import annotations


def mel_overrides(n_mels: int) -> list[str]:
    """Log-mel frames of ``n_mels`` bands read by the Q-Former's cross-attention, from the feature
    cache (order kept: front end, bands, encoder width, audio input)."""
    return [
        "audio.frontend=mel",
        f"audio.n_mels={n_mels}",
        f"qformer.encoder_width={n_mels}",
        "data.audio_input=features",
    ]
