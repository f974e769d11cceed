"""Sequence models: LSTMClassifier (fastbig.nn.LSTM) and SelfAttentionClassifier
(fastbig.nn.SelfAttention). fused=False builds the same network from torch.nn (nn.LSTM, and the
plain-torch single-head self-attention of models._layers) with identical state_dict keys."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ._layers import lstm, self_attention, sinusoidal_positions


def _input_layer(cls, input_size, vocab_size, embed_dim):
    if (input_size is None) == (vocab_size is None):
        raise ValueError(f"{cls}: give exactly one of input_size (features) or vocab_size (tokens), "
                         f"got input_size={input_size!r}, vocab_size={vocab_size!r}")
    if vocab_size is not None:
        return nn.Embedding(vocab_size, embed_dim), embed_dim
    return None, input_size


class LSTMClassifier(nn.Module):
    """(token embedding or raw features) -> LSTM (2 layers) -> fc on the last layer's final hidden
    state. forward(x [B, T] long or [B, T, input_size], lengths=None [B]) -> logits [B, C].
    With ``lengths`` the batch is packed (PackedSequence), so padding never reaches the LSTM."""

    def __init__(self, input_size: Optional[int] = None, hidden_size: int = 64, num_layers: int = 2,
                 num_classes: int = 2, vocab_size: Optional[int] = None, embed_dim: int = 32,
                 dropout: float = 0.0, bidirectional: bool = False, fused: bool = True):
        super().__init__()
        self.embedding, lstm_in = _input_layer("LSTMClassifier", input_size, vocab_size, embed_dim)
        self.bidirectional = bidirectional
        self.lstm = lstm(fused, lstm_in, hidden_size, num_layers=num_layers, batch_first=True,
                         dropout=dropout, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x, lengths=None):
        if self.embedding is not None:
            x = self.embedding(x)
        if lengths is not None:
            x = pack_padded_sequence(x, torch.as_tensor(lengths).cpu(), batch_first=True,
                                     enforce_sorted=False)
        _, (h_n, _) = self.lstm(x)
        feat = torch.cat([h_n[-2], h_n[-1]], dim=-1) if self.bidirectional else h_n[-1]
        return self.fc(feat)


class SelfAttentionClassifier(nn.Module):
    """(token embedding or Linear projection of features) + sinusoidal positions -> single-head
    self-attention (fastbig.nn.SelfAttention) with a residual and LayerNorm -> feed-forward ->
    mean over the unpadded positions -> fc.

    forward(x, key_padding_mask=None [B, T] bool, True = padding) -> logits [B, num_classes]."""

    def __init__(self, input_size: Optional[int] = None, vocab_size: Optional[int] = None,
                 embed_dim: int = 64, num_classes: int = 10, max_len: int = 512,
                 causal: bool = False, dim_feedforward: Optional[int] = None, fused: bool = True):
        super().__init__()
        emb, in_dim = _input_layer("SelfAttentionClassifier", input_size, vocab_size, embed_dim)
        self.embedding = emb
        self.proj = nn.Linear(in_dim, embed_dim) if emb is None else None
        self.register_buffer("pos", sinusoidal_positions(max_len, embed_dim), persistent=False)
        self.attn = self_attention(fused, embed_dim, causal=causal)
        self.norm1 = nn.LayerNorm(embed_dim)
        ff = dim_feedforward or 2 * embed_dim
        self.ff = nn.Sequential(nn.Linear(embed_dim, ff), nn.ReLU(), nn.Linear(ff, embed_dim))
        self.norm2 = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, x, key_padding_mask=None):
        h = self.embedding(x) if self.embedding is not None else self.proj(x)
        T = h.shape[1]
        if T > self.pos.shape[0]:
            raise ValueError(f"SelfAttentionClassifier: sequence length {T} > max_len {self.pos.shape[0]}")
        h = h + self.pos[:T].to(h.dtype)
        h = self.norm1(h + self.attn(h, key_padding_mask=key_padding_mask))
        h = self.norm2(h + self.ff(h))
        if key_padding_mask is None:
            pooled = h.mean(dim=1)
        else:
            keep = (~key_padding_mask.to(torch.bool)).to(h.dtype).unsqueeze(-1)
            pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.fc(pooled)
