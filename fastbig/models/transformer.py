"""Attention models on fastbig.nn.MultiheadAttention (fused=False: torch.nn.MultiheadAttention):

* Transformer: encoder-decoder with token embeddings, sinusoidal positions, N pre-norm layers of
  multi-head attention + LayerNorm + FFN, a causal decoder and a vocabulary head.
* BertEncoder: the BERT-base layout (word/position/token-type embeddings, post-norm layers with a
  GELU FFN, tanh pooler), configurable size; padding masks come from attention_mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ._layers import multihead_attention, sinusoidal_positions


def causal_mask(T: int, device=None) -> torch.Tensor:
    """Bool [T, T], True where attention is not allowed (a key after the query)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, fused):
        super().__init__()
        self.self_attn = multihead_attention(fused, d_model, nhead, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask=None):
        h = self.norm1(x)
        a, _ = self.self_attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        x = x + self.dropout(a)
        h = self.linear2(self.dropout(F.relu(self.linear1(self.norm2(x)))))
        return x + self.dropout(h)


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, fused):
        super().__init__()
        self.self_attn = multihead_attention(fused, d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = multihead_attention(fused, d_model, nhead, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None):
        T = y.shape[1]
        h = self.norm1(y)
        a, _ = self.self_attn(h, h, h, attn_mask=causal_mask(T, y.device), is_causal=True,
                              key_padding_mask=tgt_key_padding_mask, need_weights=False)
        y = y + self.dropout(a)
        h = self.norm2(y)
        a, _ = self.cross_attn(h, memory, memory, key_padding_mask=memory_key_padding_mask,
                               need_weights=False)
        y = y + self.dropout(a)
        h = self.linear2(self.dropout(F.relu(self.linear1(self.norm3(y)))))
        return y + self.dropout(h)


class Transformer(nn.Module):
    """Encoder-decoder transformer over token ids (batch first).

    forward(src [B, S] long, tgt_in [B, T] long, src_key_padding_mask=None, tgt_key_padding_mask=None)
    -> logits [B, T, tgt_vocab]; the decoder is causal (position t sees tgt_in[:, :t+1])."""

    def __init__(self, src_vocab: int = 16, tgt_vocab: Optional[int] = None, d_model: int = 64,
                 nhead: int = 4, num_encoder_layers: int = 2, num_decoder_layers: int = 2,
                 dim_feedforward: int = 128, dropout: float = 0.0, max_len: int = 512,
                 fused: bool = True):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"Transformer: d_model ({d_model}) must be divisible by nhead ({nhead})")
        tgt_vocab = tgt_vocab or src_vocab
        self.d_model = d_model
        self.src_embed = nn.Embedding(src_vocab, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model)
        self.register_buffer("pos", sinusoidal_positions(max_len, d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward, dropout, fused)
                                     for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, nhead, dim_feedforward, dropout, fused)
                                     for _ in range(num_decoder_layers))
        self.enc_norm = nn.LayerNorm(d_model)
        self.dec_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, tgt_vocab)

    def _embed(self, emb, tokens):
        T = tokens.shape[1]
        if T > self.pos.shape[0]:
            raise ValueError(f"Transformer: sequence length {T} > max_len {self.pos.shape[0]}")
        h = emb(tokens) * math.sqrt(self.d_model)
        return self.dropout(h + self.pos[:T].to(h.dtype))

    def encode(self, src, src_key_padding_mask=None):
        h = self._embed(self.src_embed, src)
        for layer in self.encoder:
            h = layer(h, key_padding_mask=src_key_padding_mask)
        return self.enc_norm(h)

    def decode(self, tgt_in, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None):
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, tgt_key_padding_mask, memory_key_padding_mask)
        return self.head(self.dec_norm(y))

    def forward(self, src, tgt_in, src_key_padding_mask=None, tgt_key_padding_mask=None):
        memory = self.encode(src, src_key_padding_mask)
        return self.decode(tgt_in, memory, tgt_key_padding_mask, src_key_padding_mask)

    @torch.no_grad()
    def greedy_decode(self, src, bos: int, length: int, src_key_padding_mask=None):
        """Greedy autoregressive decoding of ``length`` tokens after ``bos``."""
        memory = self.encode(src, src_key_padding_mask)
        ys = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        for _ in range(length):
            logits = self.decode(ys, memory, None, src_key_padding_mask)
            ys = torch.cat([ys, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ys[:, 1:]


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, dropout, eps, fused):
        super().__init__()
        self.attention = multihead_attention(fused, hidden, heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask=None):
        a, _ = self.attention(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.attention_norm(x + self.dropout(a))
        h = self.output(F.gelu(self.intermediate(x)))
        return self.output_norm(x + self.dropout(h))


class BertEncoder(nn.Module):
    """BERT encoder (BERT-base sizes by default). attention_mask [B, S] (1 = token, 0 = padding)
    becomes the attention's key_padding_mask.

    forward(input_ids, attention_mask=None, token_type_ids=None): logits [B, num_classes] from the
    pooled [CLS] state when num_classes is set, else the sequence output [B, S, hidden].
    ``encode`` returns (sequence_output, pooled_output)."""

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, intermediate_size: int = 3072, max_position: int = 512,
                 type_vocab_size: int = 2, dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 num_classes: Optional[int] = None, fused: bool = True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"BertEncoder: hidden_size ({hidden_size}) must be divisible by "
                             f"num_heads ({num_heads})")
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.embed_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(BertLayer(hidden_size, num_heads, intermediate_size, dropout,
                                              layer_norm_eps, fused) for _ in range(num_layers))
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, num_classes) if num_classes else None

    def encode(self, input_ids, attention_mask=None, token_type_ids=None):
        B, S = input_ids.shape
        if S > self.position_embeddings.num_embeddings:
            raise ValueError(f"BertEncoder: sequence length {S} > max_position "
                             f"{self.position_embeddings.num_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(S, device=input_ids.device)
        h = (self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
             + self.token_type_embeddings(token_type_ids))
        h = self.dropout(self.embed_norm(h))
        kpm = None
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"BertEncoder: attention_mask must be [B, S] = {(B, S)}, "
                                 f"got {tuple(attention_mask.shape)}")
            kpm = attention_mask == 0
        for layer in self.layers:
            h = layer(h, key_padding_mask=kpm)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return h, pooled

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        seq, pooled = self.encode(input_ids, attention_mask, token_type_ids)
        if self.classifier is None:
            return seq
        return self.classifier(self.dropout(pooled))
