"""Plain-torch reference of BOSSA's stage-1 losses (SPEC 3), written the way the official
``model_blip2.py:Blip2Qformer.forward`` and ``model_Qformer.py:BertLMHeadModel.forward`` compute
them (unsqueeze/matmul/squeeze similarities, ``fill_diagonal_(-10000)``, ``F.cross_entropy`` with
``label_smoothing`` and ``ignore_index``, ``view(-1, 8).mean(0)``), independent of the JAX code.

World size 1, so the gathers are identities and the positives sit on the diagonal. ITM negatives
are given as indices (the official code draws them with ``torch.multinomial``).

:class:`Stage1Torch` wires these losses to the torch Q-Former reference
(``tests/reference/qformer_torch.py``) for the full-model comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FIELD_WEIGHTS = [0.25, 0.25, 0.05, 0.25, 0.1, 0.05, 0.025, 0.025]
DEC_ID = 1237


def itc(image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor):
    """image_feats (B, Q, D), text_feat (B, D), unit vectors. Returns (loss, sim_i2t, sim_t2i)."""
    image_feats_all, text_feat_all = image_feats, text_feat  # concat_all_gather, world size 1
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)
    sim_i2t, _ = sim_q2t.max(-1)  # (B, B)
    sim_i2t = sim_i2t / temp
    sim_t2q = torch.matmul(
        text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)
    ).squeeze(-2)
    sim_t2i, _ = sim_t2q.max(-1)
    sim_t2i = sim_t2i / temp
    targets = torch.arange(image_feats.shape[0], dtype=torch.long)
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
    ) / 2
    return loss, sim_i2t, sim_t2i


def hard_negative_weights(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor):
    """(weights_i2t, weights_t2i): softmax rows with the diagonal filled with -10000."""
    with torch.no_grad():
        sim_t2i = sim_t2i.clone()
        sim_i2t = sim_i2t.clone()
        sim_t2i.fill_diagonal_(-10000)
        sim_i2t.fill_diagonal_(-10000)
        return F.softmax(sim_i2t, dim=1), F.softmax(sim_t2i, dim=1)


def itm(match_logits: torch.Tensor) -> torch.Tensor:
    """match_logits (3B, Q, 2) per query: mean over queries, CE with labels [1]*B + [0]*2B."""
    logits = match_logits.mean(dim=1)
    bs = logits.shape[0] // 3
    labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
    return F.cross_entropy(logits, labels)


def itg_inputs(notes: torch.Tensor, leadsheet_mask: torch.Tensor, pad_mask: torch.Tensor):
    """(decoder input ids, labels) as Blip2Qformer.forward builds them (SPEC 3.4)."""
    input_ids = notes.clone()
    input_ids[input_ids == 0] = DEC_ID
    note_mask = (leadsheet_mask * pad_mask).repeat_interleave(8, dim=-1)
    labels = input_ids.masked_fill(note_mask == 0, -100)
    labels = labels.masked_fill(labels == DEC_ID, -100)
    return input_ids, labels


def itg(prediction_scores: torch.Tensor, labels: torch.Tensor, field_mean: str = "official"):
    """prediction_scores (B, 8N, C), labels (B, 8N). Returns (weighted loss, per-field (8,)).

    official: per-field mean over all B*(N-1) slots (ignored ones contribute 0, SPEC 10.13);
    valid: per-field sum divided by the field's number of valid targets."""
    shifted = prediction_scores[:, :-8, :].contiguous()
    targets = labels[:, 8:].contiguous()
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
    per_token = loss_fct(shifted.view(-1, shifted.shape[-1]), targets.view(-1)).view(-1, 8)
    if field_mean == "official":
        per_field = per_token.mean(0)
    else:
        count = (targets.view(-1, 8) != -100).sum(0).clamp(min=1)
        per_field = per_token.sum(0) / count
    weights = torch.tensor(FIELD_WEIGHTS, dtype=per_field.dtype)
    return (per_field * weights).sum() / weights.sum(), per_field


class FP32LayerNorm(torch.nn.LayerNorm):
    """``Blip2Qformer.layer_norm``: LayerNorm computed in fp32, cast back (SPEC 1.3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.float32)).to(x.dtype)


class Stage1Torch(torch.nn.Module):
    """The official ``Blip2Qformer`` minus MusicGen (features are given): official parameter
    names (``Qformer``, ``query_tokens``, ``layer_norm``, ``audio_proj``, ``symbo_proj``,
    ``binary_head``, ``temp``), so ``state_dict()`` has the stage-1 checkpoint layout of SPEC 7."""

    def __init__(self, config, proj_dim: int = 256):
        from tests.reference.qformer_torch import BertLMHeadModel

        super().__init__()
        self.Qformer = BertLMHeadModel(config)
        self.Qformer.resize_token_embeddings_mean(config.vocab_size + 1)
        self.query_tokens = torch.nn.Parameter(
            torch.zeros(1, config.query_length, config.hidden_size).normal_(0.0, 0.02)
        )
        self.layer_norm = FP32LayerNorm(config.encoder_width, eps=1e-5)
        self.audio_proj = torch.nn.Linear(config.hidden_size, proj_dim)
        self.symbo_proj = torch.nn.Linear(config.hidden_size, proj_dim)
        self.binary_head = torch.nn.Linear(config.hidden_size, 2)
        self.temp = torch.nn.Parameter(0.07 * torch.ones([]))

    def forward(
        self,
        features: torch.Tensor,
        audio_mask: torch.Tensor,
        notes: torch.Tensor,
        leadsheet_mask: torch.Tensor,
        pad_mask: torch.Tensor,
        neg_symbo_idx: torch.Tensor,
        neg_audio_idx: torch.Tensor,
        official_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``Blip2Qformer.forward`` with given ITM negatives: ``neg_audio_idx[b]`` is the audio
        paired with symbolic b (``image_embeds_neg``), ``neg_symbo_idx[b]`` the symbolic sample
        paired with audio b (``text_ids_neg``). Returns every loss, the official per-field LM
        losses and the corrected ("valid") ones; ``official_only`` leaves the latter out (what the
        official step computes, for benchmarks)."""
        bs = notes.shape[0]
        audio_embeds = self.layer_norm(features)
        query_tokens = self.query_tokens.expand(bs, -1, -1)
        query_output, past_key_values = self.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=audio_embeds,
            encoder_attention_mask=audio_mask,
        )
        audio_feats = F.normalize(self.audio_proj(query_output), dim=-1)

        note_mask = leadsheet_mask * pad_mask
        text_output, _ = self.Qformer.bert(input_ids=notes, attention_mask=note_mask)
        sos_index = (1 - leadsheet_mask).sum(-1).long()
        text_feat = F.normalize(self.symbo_proj(text_output[torch.arange(bs), sos_index]), dim=-1)

        # ITC
        loss_itc, sim_i2t, sim_t2i = itc(audio_feats, text_feat, self.temp)

        # ITM: symbolic [pos, pos, neg], audio [pos, neg, pos]
        audio_embeds_neg = audio_embeds[neg_audio_idx]
        audio_mask_neg = audio_mask[neg_audio_idx]
        notes_neg = notes[neg_symbo_idx]
        note_mask_neg = note_mask[neg_symbo_idx]
        text_ids_all = torch.cat([notes, notes, notes_neg], dim=0)
        text_atts_all = torch.cat([note_mask, note_mask, note_mask_neg], dim=0)
        query_tokens_itm = self.query_tokens.expand(text_ids_all.shape[0], -1, -1)
        query_atts_itm = torch.ones(query_tokens_itm.shape[:-1], dtype=text_atts_all.dtype)
        attention_mask_all = torch.cat([query_atts_itm, text_atts_all], dim=1)
        audio_embeds_all = torch.cat([audio_embeds, audio_embeds_neg, audio_embeds], dim=0)
        audio_atts_all = torch.cat([audio_mask, audio_mask_neg, audio_mask], dim=0)
        output_itm, _ = self.Qformer.bert(
            text_ids_all,
            query_embeds=query_tokens_itm,
            attention_mask=attention_mask_all,
            encoder_hidden_states=audio_embeds_all,
            encoder_attention_mask=audio_atts_all,
        )
        vl_embeddings = output_itm[:, : query_tokens_itm.shape[1], :]
        loss_itm = itm(self.binary_head(vl_embeddings))

        # ITG: the official reduction="none" path, then the per-field weighting
        from tests.reference.qformer_torch import itg_weighted_loss

        decoder_input_ids, labels = itg_inputs(notes, leadsheet_mask, pad_mask)
        query_atts = torch.ones(query_tokens.shape[:-1], dtype=pad_mask.dtype)
        attention_mask = torch.cat([query_atts, pad_mask], dim=1)
        logits, _, per_token = self.Qformer(
            decoder_input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            labels=labels,
            reduction="none",
        )
        loss_lm, fields = itg_weighted_loss(per_token)
        out = {"itc": loss_itc, "itm": loss_itm, "itg": loss_lm, "itg_fields": fields}
        out["loss"] = loss_itc + loss_itm + loss_lm
        if official_only:
            return out
        loss_lm_valid, fields_valid = itg(logits, labels, field_mean="valid")
        out.update(
            itg_valid=loss_lm_valid,
            itg_fields_valid=fields_valid,
            loss_valid=loss_itc + loss_itm + loss_lm_valid,
            sim_i2t=sim_i2t,
            sim_t2i=sim_t2i,
        )
        return out
