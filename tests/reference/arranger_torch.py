"""Plain-torch reference of BOSSA's stage 2 (SPEC 4.1-4.3), written the way the official
``model_blip2.py:Blip2Musecoco.forward`` computes it, on this project's torch Q-Former
(``qformer_torch.py``) and torch MuseCoco (``musecoco_torch.py``) references.

:class:`Stage2Torch` has the official parameter names (``blip2qformer.*`` = the stage-1 model with
the deleted modules set to None, ``musecoco.*`` with ``lora_{q,k,v}``, ``musecoco_proj``), so its
``state_dict()`` has the stage-2 checkpoint layout of SPEC 7 (without MusicGen: features given).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.reference.losses_torch import Stage1Torch
from tests.reference.musecoco_torch import MuseCocoLM, shifted_loss

POS_START = 61  # encode_input_ids(token, pos_start=61)


class Stage2Torch(nn.Module):
    def __init__(self, qformer_config, musecoco_kwargs: dict):
        super().__init__()
        self.blip2qformer = Stage1Torch(qformer_config)
        # Blip2Musecoco.__init__ deletes the symbolic stream (SPEC 4.1)
        bert = self.blip2qformer.Qformer.bert
        bert.embeddings.word_embeddings = None
        bert.embeddings.position_embeddings = None
        bert.embeddings.downsampling = None
        for layer in bert.encoder.layer:
            layer.intermediate = None
            layer.output = None
        self.blip2qformer.Qformer.upsampling = None
        self.blip2qformer.Qformer.cls = None
        self.blip2qformer.binary_head = None
        self.blip2qformer.symbo_proj = None
        self.blip2qformer.audio_proj = None
        self.blip2qformer.temp = None
        self.musecoco = MuseCocoLM(**musecoco_kwargs)
        self.musecoco_proj = nn.Linear(
            qformer_config.hidden_size, musecoco_kwargs["d"]
        )  # PyTorch default init, as the official Linear(768 -> 2048)

    def forward(self, features, audio_mask, tokens, control_mask, pad_mask):
        """Returns (logits (B, Q + L, V), labels (B, Q + L), loss) as ``Blip2Musecoco.forward``."""
        qformer = self.blip2qformer
        audio_embeds = qformer.layer_norm(features)
        query_tokens = qformer.query_tokens.expand(features.shape[0], -1, -1)
        query_output, _ = qformer.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=audio_embeds,
            encoder_attention_mask=audio_mask,
        )
        inputs_musecoco = self.musecoco_proj(query_output)
        decoder = self.musecoco.decoder
        token_embeds = decoder.encode_input_ids(tokens, pos_start=POS_START)
        embeds = torch.cat([inputs_musecoco, token_embeds], dim=1)
        query_pad = torch.zeros(inputs_musecoco.shape[:2], dtype=torch.bool)
        attention_mask = torch.cat([query_pad, pad_mask], dim=1)
        labels = tokens.masked_fill(control_mask | pad_mask, -100)
        query_labels = torch.full(inputs_musecoco.shape[:2], -100, dtype=labels.dtype)
        labels = torch.cat([query_labels, labels], dim=1)
        logits = self.musecoco.lm_head(decoder(embeds, attention_mask))
        return logits, labels, shifted_loss(logits, labels)
