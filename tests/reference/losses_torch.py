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
