"""A PyTorch MuseCoco written from SPEC 4.3-4.5 (the HF port ``modeling_musecoco.py`` cannot be
imported under transformers 5, SPEC 9.3), for parity tests and converter round trips.

Parameter names are the HF port's (``decoder.layers.N.self_attn.q_proj.weight``,
``...self_attn.lora_q.lora_A``, ``lm_head.weight``; ``decoder.embed_positions._float_tensor`` is the
fairseq dtype buffer), so its ``state_dict()`` is a checkpoint in the layout of
``reference/musecoco-1b/state_dict_keys.json`` plus the stage-2 LoRA keys.

The causal product (the numerator sum_{j<=i} (phi(q_i) . phi(k_j)) v_j) is pluggable:
``"fast_transformers"`` uses ``fast_transformers.causal_product.causal_dot_product``, the kernel the
official code calls (an independent implementation); ``"torch"`` the cumulative sum of outer
products in torch's own ops. Everything else (feature map, key masking, the normaliser computed as
fast-transformers' ``CausalLinearAttention`` does) is this project's own re-implementation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PADDING_IDX = 1


def torch_causal_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, H, L, D) x (N, H, L, D) x (N, H, L, M) -> (N, H, L, M): q_i . sum_{j<=i} k_j v_j^T."""
    states = torch.cumsum(torch.einsum("nhld,nhlm->nhldm", k, v), dim=2)
    return torch.einsum("nhld,nhldm->nhlm", q, states)


def causal_product(kind: str):
    if kind == "torch":
        return torch_causal_product
    if kind == "fast_transformers":
        from fast_transformers.causal_product import causal_dot_product

        return causal_dot_product
    raise ValueError(kind)


def fairseq_table(num_embeddings: int, dim: int, padding_idx: int = PADDING_IDX) -> torch.Tensor:
    """fairseq ``SinusoidalPositionalEmbedding.get_embedding``: sin half first, pad row zero."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    table = torch.arange(num_embeddings, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(table), torch.cos(table)], dim=1).view(num_embeddings, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_embeddings, 1)], dim=1)
    table[padding_idx] = 0
    return table


def make_positions(tokens: torch.Tensor, padding_idx: int = PADDING_IDX) -> torch.Tensor:
    """fairseq ``utils.make_positions``."""
    mask = tokens.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


class LoRALayer(nn.Module):
    """SPEC 4.4: delta(x) = scaling * B A x, A (r, in) ~ N(0,1)/r, B (out, r) = 0."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float = 1.0):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features) / rank)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class AttentionLayer(nn.Module):
    """q/k/v Linear(d -> H * (d // H)) + LoRA, causal linear attention, out_proj back to d."""

    def __init__(self, d: int, heads: int, rank: int, scaling: float, product: str):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        inner = heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, d)
        self.lora_q, self.lora_k, self.lora_v = (
            LoRALayer(d, inner, rank, scaling) for _ in range(3)
        )
        self.product = causal_product(product)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape

        def heads(t):
            return t.view(n, length, self.heads, self.head_dim)

        q = heads(self.q_proj(x) + self.lora_q(x))
        k = heads(self.k_proj(x) + self.lora_k(x))
        v = heads(self.v_proj(x) + self.lora_v(x))
        q = nn.functional.elu(q) + 1
        k = nn.functional.elu(k) + 1
        k = k * (~pad_mask).float()[:, :, None, None]  # padded keys zeroed after phi
        z = 1 / (torch.einsum("nlhi,nlhi->nlh", q, k.cumsum(1)) + self.eps)
        numerator = self.product(
            q.permute(0, 2, 1, 3).contiguous(),
            k.permute(0, 2, 1, 3).contiguous(),
            v.permute(0, 2, 1, 3).contiguous(),
        ).permute(0, 2, 1, 3)
        out = numerator * z[..., None]
        return self.out_proj(out.reshape(n, length, self.heads * self.head_dim))


class MuseCocoBlock(nn.Module):
    def __init__(self, d, heads, ffn, rank, scaling, dropout, product):
        super().__init__()
        self.self_attn = AttentionLayer(d, heads, rank, scaling, product)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pad_mask):
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), pad_mask))
        h = self.fc2(nn.functional.gelu(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(h)


class MuseCocoDecoder(nn.Module):
    def __init__(self, vocab, d, heads, layers, ffn, rank, scaling, dropout, positions, product):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d, padding_idx=PADDING_IDX)
        self.embed_scale = math.sqrt(d)
        self.embed_positions = nn.Module()
        self.embed_positions.register_buffer("_float_tensor", torch.FloatTensor(1))
        self.register_buffer("table", fairseq_table(positions + 2, d), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            MuseCocoBlock(d, heads, ffn, rank, scaling, dropout, product) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(d, eps=1e-5)

    def encode_input_ids(self, tokens: torch.Tensor, pos_start: int = 0) -> torch.Tensor:
        """SPEC 4.3: scaled embeddings; positions only from ``pos_start`` on; dropout."""
        x = self.embed_scale * self.embed_tokens(tokens)
        positions = self.table[make_positions(tokens[:, pos_start:])]
        x = torch.cat([x[:, :pos_start], x[:, pos_start:] + positions], dim=1)
        return self.dropout(x)

    def forward(self, embeds: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = embeds
        for layer in self.layers:
            x = layer(x, pad_mask)
        return self.layer_norm(x)


class MuseCocoLM(nn.Module):
    """``MuseCocoLMHeadModel`` (decoder + untied lm_head without bias) for tiny sizes."""

    def __init__(
        self,
        vocab: int = 1253,
        d: int = 64,
        heads: int = 3,
        layers: int = 2,
        ffn: int = 128,
        rank: int = 4,
        scaling: float = 1.0,
        dropout: float = 0.1,
        positions: int = 8192,
        product: str = "torch",
    ):
        super().__init__()
        self.decoder = MuseCocoDecoder(
            vocab, d, heads, layers, ffn, rank, scaling, dropout, positions, product
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)

    @classmethod
    def from_config(cls, cfg, product: str = "torch") -> MuseCocoLM:
        """The sizes of a ``bossa_jax.config.MuseCocoConfig``."""
        return cls(
            vocab=cfg.vocab_size,
            d=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            layers=cfg.num_hidden_layers,
            ffn=cfg.ffn_dim,
            rank=cfg.lora_rank,
            product=product,
        )

    def forward(self, tokens, pad_mask, prefix=None, pos_start: int = 0) -> torch.Tensor:
        """Logits (B, P + L, vocab): [prefix ; encode_input_ids(tokens)], mask [False x P ; pad]."""
        x = self.decoder.encode_input_ids(tokens, pos_start)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
            pad_mask = torch.cat([torch.zeros(prefix.shape[:2], dtype=torch.bool), pad_mask], dim=1)
        return self.lm_head(self.decoder(x, pad_mask))


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The HF LM loss: logits[:, :-1] against labels[:, 1:], mean over labels != -100."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
