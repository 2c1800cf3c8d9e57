"""Plain-torch re-creation of the official BOSSA Q-Former (``model_Qformer.py``:
``BertLMHeadModel`` / ``BertModel``), written from SPEC 2.2, 3.4 and LAVIS's ``Qformer.py``,
because transformers 5 can no longer import the official file (SPEC 9.3).

Module and parameter names are the official ones (``bert.embeddings.word_embeddings``,
``bert.encoder.layer.{i}.attention.self.query``, ``crossattention``, ``intermediate_query``,
``upsampling``, ``cls.predictions.*``), so official state dicts load into it and the SPEC 2.3
renaming can be applied to a fairseq MusicBERT state dict exactly as ``init_Qformer`` does.

Reference only (tests): eager attention with the official additive masks (-10000 for
self-attention, finfo(fp32).min for cross-attention), past_key_values in the (B, H, L, D) layout.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

FIELDS = 8
# SPEC 3.4: [bar, pos, inst, pitch, dur, vel, ts, tempo]
ITG_FIELD_WEIGHTS = (0.25, 0.25, 0.05, 0.25, 0.1, 0.05, 0.025, 0.025)

# substring renames MusicBERT (fairseq) -> BOSSA, in the order of SPEC 2.3's table
MUSICBERT_RENAMES = (
    ("encoder.sentence_encoder.layers", "bert.encoder.layer"),
    ("self_attn.q_proj", "attention.self.query"),
    ("self_attn.k_proj", "attention.self.key"),
    ("self_attn.v_proj", "attention.self.value"),
    ("self_attn.out_proj", "attention.output.dense"),
    ("self_attn_layer_norm", "attention.output.LayerNorm"),
    ("fc1", "intermediate.dense"),
    ("fc2", "output.dense"),
    ("final_layer_norm", "output.LayerNorm"),
    ("encoder.sentence_encoder.embed_tokens", "bert.embeddings.word_embeddings"),
    ("encoder.sentence_encoder.embed_positions", "bert.embeddings.position_embeddings"),
    ("encoder.sentence_encoder.emb_layer_norm", "bert.embeddings.LayerNorm"),
    ("encoder.sentence_encoder.downsampling.0", "bert.embeddings.downsampling"),
    ("encoder.sentence_encoder.upsampling.0", "upsampling"),
    ("encoder.lm_head.dense", "cls.predictions.transform.dense"),
    ("encoder.lm_head.layer_norm", "cls.predictions.transform.LayerNorm"),
    ("encoder.lm_head.weight", "cls.predictions.decoder.weight"),
    ("encoder.lm_head.bias", "cls.predictions.decoder.bias"),
)


@dataclasses.dataclass
class RefConfig:
    """The BertConfig fields the official Q-Former reads (SPEC 2.1; BertConfig names)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    vocab_size: int = 1237
    max_position_embeddings: int = 8194
    pad_token_id: int = 1
    encoder_width: int = 2048
    add_cross_attention: bool = True
    cross_attention_freq: int = 2
    query_length: int = 32


class BertEmbeddings(nn.Module):
    """Octuple embeddings: word table, 8 ids -> downsampling, note positions, queries prepended
    after the position add, LayerNorm + dropout over everything (SPEC 2.2)."""

    def __init__(self, config: RefConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.downsampling = nn.Linear(FIELDS * h, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1))
        )

    def forward(self, input_ids=None, position_ids=None, query_embeds=None, past_length=0):
        if input_ids is not None:
            batch, num_ids = input_ids.shape
            n = num_ids // FIELDS
            if position_ids is None:
                position_ids = self.position_ids[:, past_length : n + past_length].clone()
            words = self.word_embeddings(input_ids).reshape(batch, n, -1)
            embeddings = self.downsampling(words) + self.position_embeddings(position_ids)
            if query_embeds is not None:
                embeddings = torch.cat((query_embeds, embeddings), dim=1)
        else:
            embeddings = query_embeds
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, config: RefConfig, is_cross_attention: bool):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_width, self.all_head_size)
        self.value = nn.Linear(kv_width, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def transpose_for_scores(self, x):
        x = x.view(x.shape[:-1] + (self.num_attention_heads, self.attention_head_size))
        return x.permute(0, 2, 1, 3)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
    ):
        if encoder_hidden_states is not None:
            key_layer = self.transpose_for_scores(self.key(encoder_hidden_states))
            value_layer = self.transpose_for_scores(self.value(encoder_hidden_states))
            attention_mask = encoder_attention_mask
        elif past_key_value is not None:
            key_layer = self.transpose_for_scores(self.key(hidden_states))
            value_layer = self.transpose_for_scores(self.value(hidden_states))
            key_layer = torch.cat([past_key_value[0], key_layer], dim=2)
            value_layer = torch.cat([past_key_value[1], value_layer], dim=2)
        else:
            key_layer = self.transpose_for_scores(self.key(hidden_states))
            value_layer = self.transpose_for_scores(self.value(hidden_states))
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        present = (key_layer, value_layer)
        scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        scores = scores / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(nn.Softmax(dim=-1)(scores))
        context = torch.matmul(probs, value_layer).permute(0, 2, 1, 3).contiguous()
        context = context.view(context.shape[:-2] + (self.all_head_size,))
        return context, present


class BertSelfOutput(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config: RefConfig, is_cross_attention: bool = False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
    ):
        context, present = self.self(
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            past_key_value,
        )
        return self.output(context, hidden_states), present


class BertIntermediate(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        assert config.hidden_act == "gelu"

    def forward(self, hidden_states):
        return F.gelu(self.dense(hidden_states))  # HF "gelu" = exact erf GELU


class BertOutput(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config: RefConfig, layer_num: int):
        super().__init__()
        self.attention = BertAttention(config)
        self.layer_num = layer_num
        self.has_cross_attention = (
            config.add_cross_attention and layer_num % config.cross_attention_freq == 0
        )
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.intermediate_query = BertIntermediate(config)
        self.output_query = BertOutput(config)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
        query_length=0,
    ):
        attention_output, present = self.attention(
            hidden_states, attention_mask, past_key_value=past_key_value
        )
        if query_length > 0:
            query_attention_output = attention_output[:, :query_length, :]
            if self.has_cross_attention:
                assert encoder_hidden_states is not None, "cross-attention needs audio features"
                query_attention_output, _ = self.crossattention(
                    query_attention_output,
                    attention_mask,
                    encoder_hidden_states,
                    encoder_attention_mask,
                )
            layer_output = self.output_query(
                self.intermediate_query(query_attention_output), query_attention_output
            )
            if attention_output.shape[1] > query_length:
                text = attention_output[:, query_length:, :]
                layer_output_text = self.output(self.intermediate(text), text)
                layer_output = torch.cat([layer_output, layer_output_text], dim=1)
        else:
            layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, present


class BertEncoder(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        query_length=0,
    ):
        presents = []
        for i, layer in enumerate(self.layer):
            past = past_key_values[i] if past_key_values is not None else None
            hidden_states, present = layer(
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                past,
                query_length,
            )
            presents.append(present)
        return hidden_states, tuple(presents)


class BertModel(nn.Module):
    """``bert`` of the official ``BertLMHeadModel`` (no pooler)."""

    def __init__(self, config: RefConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @staticmethod
    def get_extended_attention_mask(attention_mask, notes_shape, is_decoder, has_query=False):
        """LAVIS/BOSSA: 2-D mask -> additive (1 - m) * -10000; decoder mode adds a causal mask
        over the notes with an all-ones prefix for the cached query keys (SPEC 2.2, 3.4)."""
        if attention_mask.dim() == 3:
            extended = attention_mask[:, None, :, :]
        elif is_decoder:
            batch, seq_length = notes_shape
            seq_ids = torch.arange(seq_length, device=attention_mask.device)
            causal = seq_ids[None, None, :].repeat(batch, seq_length, 1) <= seq_ids[None, :, None]
            causal = causal.to(attention_mask.dtype)
            if causal.shape[1] < attention_mask.shape[1]:
                prefix = attention_mask.shape[1] - causal.shape[1]
                if has_query:  # UniLM-style: query rows see only the queries
                    causal = torch.cat(
                        [torch.zeros((batch, prefix, seq_length), dtype=causal.dtype), causal],
                        dim=1,
                    )
                causal = torch.cat(
                    [torch.ones((batch, causal.shape[1], prefix), dtype=causal.dtype), causal],
                    dim=-1,
                )
            extended = causal[:, None, :, :] * attention_mask[:, None, None, :]
        else:
            extended = attention_mask[:, None, None, :]
        extended = extended.to(torch.float32)
        return (1.0 - extended) * -10000.0

    @staticmethod
    def invert_attention_mask(encoder_attention_mask):
        """HF ``invert_attention_mask``: masked keys get finfo(fp32).min."""
        extended = encoder_attention_mask[:, None, None, :].to(torch.float32)
        return (1.0 - extended) * torch.finfo(torch.float32).min

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        query_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        is_decoder=False,
    ):
        """Returns (sequence_output, per-layer self-attention (k, v) in (B, H, L, D))."""
        past_length = (
            past_key_values[0][0].shape[2] - self.config.query_length
            if past_key_values is not None
            else 0
        )
        query_length = query_embeds.shape[1] if query_embeds is not None else 0
        embedding_output = self.embeddings(
            input_ids=input_ids, query_embeds=query_embeds, past_length=past_length
        )
        batch, seq_length = embedding_output.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones((batch, seq_length + past_length))
        if is_decoder:
            notes = (batch, input_ids.shape[1] // FIELDS)
            extended = self.get_extended_attention_mask(
                attention_mask, notes, True, has_query=query_embeds is not None
            )
        else:
            extended = self.get_extended_attention_mask(attention_mask, None, False)
        encoder_extended = None
        if encoder_hidden_states is not None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2])
            encoder_extended = self.invert_attention_mask(encoder_attention_mask)
        return self.encoder(
            embedding_output,
            attention_mask=extended,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_extended,
            past_key_values=past_key_values,
            query_length=query_length,
        )


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # as HF/LAVIS: one tensor under two names

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class BertLMHeadModel(nn.Module):
    """The official Q-Former with its LM head: ``bert``, ``upsampling``, ``cls`` (untied)."""

    def __init__(self, config: RefConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.upsampling = nn.Linear(config.hidden_size, FIELDS * config.hidden_size)
        self.cls = BertOnlyMLMHead(config)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """HF BERT init: normal(0, 0.02) weights, zero biases, padding row zero, LN 1/0."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def resize_token_embeddings_mean(self, new_num_tokens: int) -> None:
        """transformers 4.48 ``resize_token_embeddings`` as it behaves in BOSSA (SPEC 2.3): new rows
        = exact mean of the old rows; same module, so padding_idx stays; the head is untouched."""
        emb = self.bert.embeddings.word_embeddings
        old = emb.weight.data
        added = new_num_tokens - old.shape[0]
        mean = torch.mean(old.to(torch.float32), dim=0)
        emb.weight = nn.Parameter(torch.cat([old, mean[None].repeat(added, 1).to(old.dtype)]))
        emb.num_embeddings = new_num_tokens

    def load_musicbert(self, fairseq_state_dict: dict[str, torch.Tensor]) -> None:
        """``init_Qformer(load_pretrained=True)`` (SPEC 2.3): substring renames, strict=False load,
        ``*_query`` parameters copied from the text FFN (call before the resize)."""
        renamed = {}
        for key, value in fairseq_state_dict.items():
            for old, new in MUSICBERT_RENAMES:
                key = key.replace(old, new)
            renamed[key] = value
        self.load_state_dict(renamed, strict=False)
        with torch.no_grad():
            params = dict(self.named_parameters())
            for name, param in params.items():
                if "_query" in name:
                    param.copy_(params[name.replace("_query", "")])

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        query_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        labels=None,
        is_decoder=True,
        reduction="mean",
    ):
        """Returns (logits (B, 8N, vocab), per-layer (k, v), loss or None). The loss shifts by one
        note (8 ids), label smoothing 0.1, -100 ignored (SPEC 3.4)."""
        sequence_output, presents = self.bert(
            input_ids,
            attention_mask=attention_mask,
            query_embeds=query_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            is_decoder=is_decoder,
        )
        if query_embeds is not None:
            sequence_output = sequence_output[:, query_embeds.shape[1] :, :]
        batch, n, hidden = sequence_output.shape
        upsampled = self.upsampling(sequence_output).reshape(batch, n * FIELDS, hidden)
        logits = self.cls(upsampled)
        loss = None
        if labels is not None:
            shifted = logits[:, :-FIELDS, :].contiguous()
            targets = labels[:, FIELDS:].contiguous()
            loss = F.cross_entropy(
                shifted.view(-1, self.config.vocab_size),
                targets.view(-1),
                reduction=reduction,
                label_smoothing=0.1,
                ignore_index=-100,
            )
        return logits, presents, loss


def itg_weighted_loss(per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 3.4's per-field weighting of the ``reduction="none"`` LM loss: reshape to (-1, 8),
    mean over dim 0 (ignored slots count as 0), weighted average. Returns (loss, per-field)."""
    fields = per_token_loss.reshape(-1, FIELDS).mean(dim=0)
    weights = torch.tensor(ITG_FIELD_WEIGHTS, dtype=fields.dtype)
    return (fields * weights).sum() / weights.sum(), fields
