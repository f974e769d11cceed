"""The layers a model is built from: fastbig.nn's fused modules (fused=True) or their plain
torch.nn twins (fused=False). Each pair has identical state_dict keys, so a twin loads the fused
model's state_dict with strict=True (and the other way round).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import nn as fnn


def _bn(out_channels, eps, momentum, affine, track_running_stats, device, dtype):
    return nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                          track_running_stats=track_running_stats, device=device, dtype=dtype)


def conv_bn_act(fused: bool, act: str, in_channels, out_channels, kernel_size, stride=1, padding=0,
                dilation=1, groups=1, bias=False, padding_mode="zeros", eps=1e-5, momentum=0.1,
                affine=True, track_running_stats=True, negative_slope=0.01, device=None,
                dtype=None) -> nn.Module:
    """Conv2d -> BatchNorm2d -> act, act in {"relu", "leaky_relu", "none"}.

    fused: fastbig.nn.ConvBnReLU2d / ConvBnLeakyReLU2d / ConvBn2d. Twin: nn.Sequential(conv, bn[, act]).
    """
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
              padding_mode=padding_mode, eps=eps, momentum=momentum, affine=affine,
              track_running_stats=track_running_stats, device=device, dtype=dtype)
    if fused:
        if act == "relu":
            return fnn.ConvBnReLU2d(in_channels, out_channels, kernel_size, **kw)
        if act == "leaky_relu":
            return fnn.ConvBnLeakyReLU2d(in_channels, out_channels, kernel_size,
                                         negative_slope=negative_slope, **kw)
        if act == "none":
            return fnn.ConvBn2d(in_channels, out_channels, kernel_size, **kw)
        raise ValueError(f"conv_bn_act: act must be 'relu', 'leaky_relu' or 'none', got {act!r}")
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                     device=device, dtype=dtype)
    bn = _bn(out_channels, eps, momentum, affine, track_running_stats, device, dtype)
    if act == "relu":
        return nn.Sequential(conv, bn, nn.ReLU())
    if act == "leaky_relu":
        return nn.Sequential(conv, bn, nn.LeakyReLU(negative_slope))
    if act == "none":
        return nn.Sequential(conv, bn)
    raise ValueError(f"conv_bn_act: act must be 'relu', 'leaky_relu' or 'none', got {act!r}")


def conv_transpose_bn_relu(fused: bool, in_channels, out_channels, kernel_size, stride=1, padding=0,
                           output_padding=0, groups=1, bias=False, dilation=1, eps=1e-5,
                           momentum=0.1, affine=True, track_running_stats=True, device=None,
                           dtype=None) -> nn.Module:
    kw = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
              bias=bias, dilation=dilation)
    if fused:
        return fnn.ConvTransposeBnReLU2d(in_channels, out_channels, kernel_size, eps=eps,
                                         momentum=momentum, affine=affine,
                                         track_running_stats=track_running_stats,
                                         device=device, dtype=dtype, **kw)
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size, device=device, dtype=dtype, **kw),
        _bn(out_channels, eps, momentum, affine, track_running_stats, device, dtype),
        nn.ReLU())


def lstm(fused: bool, *args, **kwargs) -> nn.Module:
    return (fnn.LSTM if fused else nn.LSTM)(*args, **kwargs)


def lstm_cell(fused: bool, *args, **kwargs) -> nn.Module:
    return (fnn.LSTMCell if fused else nn.LSTMCell)(*args, **kwargs)


def multihead_attention(fused: bool, *args, **kwargs) -> nn.Module:
    return (fnn.MultiheadAttention if fused else nn.MultiheadAttention)(*args, **kwargs)


class TorchSelfAttention(nn.Module):
    """The torch.nn twin of fastbig.nn.SelfAttention: single head, Linear query/key/value,
    scale 1/sqrt(E), key_padding_mask bool [B, S] with True = padded key (ignored)."""

    def __init__(self, embed_dim: int, bias: bool = True, causal: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.causal = causal
        self.query = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.key = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.value = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x, key_padding_mask=None):
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.embed_dim)
        S = x.shape[1]
        if self.causal:
            cm = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(cm, float("-inf"))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :].to(torch.bool), float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def self_attention(fused: bool, embed_dim: int, bias: bool = True, causal: bool = False) -> nn.Module:
    if fused:
        return fnn.SelfAttention(embed_dim, bias=bias, causal=causal)
    return TorchSelfAttention(embed_dim, bias=bias, causal=causal)


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    """The fixed sinusoidal positional encoding of "Attention is all you need": [max_len, dim]."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    div = torch.exp(-math.log(10000.0) * i / dim)
    pe = torch.zeros(max_len, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe.to(torch.float32)
