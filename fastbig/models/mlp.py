"""Dense models: MLP, Autoencoder and Wide&Deep. They hold no layer that fastbig fuses (Linear,
ReLU, Embedding), so the fused and the torch.nn variant are the same network; ``fused`` is
accepted for a uniform interface."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _dense_stack(sizes: Sequence[int], act=nn.ReLU) -> list:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return layers


class MLP(nn.Module):
    """in_features -> 64 -> 64 -> num_classes with ReLU (784-64-64-10 by default).
    Accepts images: the input is flattened from dim 1."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (64, 64),
                 num_classes: int = 10, fused: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(1), *_dense_stack([in_features, *hidden]),
                                 nn.Linear(hidden[-1] if hidden else in_features, num_classes))

    def forward(self, x):
        return self.net(x)


class Autoencoder(nn.Module):
    """Linear+ReLU encoder to a latent code, Linear+ReLU ... Linear+Sigmoid decoder.
    forward(x) returns the reconstruction in x's shape (values in (0, 1))."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (32,), latent: int = 16,
                 fused: bool = True):
        super().__init__()
        self.in_features = in_features
        self.encoder = nn.Sequential(*_dense_stack([in_features, *hidden, latent]))
        dec = [latent, *reversed(list(hidden))]
        self.decoder = nn.Sequential(*_dense_stack(dec), nn.Linear(dec[-1], in_features), nn.Sigmoid())

    def encode(self, x):
        return self.encoder(torch.flatten(x, 1))

    def forward(self, x):
        return self.decoder(self.encode(x)).reshape(x.shape)


class WideDeep(nn.Module):
    """Wide & Deep: a wide linear part over dense + one-hot (hashed cross) features, plus a deep MLP
    over categorical embeddings and dense features; returns one logit per row.

    forward(dense [B, num_dense] float, categorical [B, len(cardinalities)] long, wide=None)
    ``wide`` is an optional [B, num_wide] float tensor of extra wide-only features (e.g. crosses).
    """

    def __init__(self, num_dense: int = 4, cardinalities: Sequence[int] = (10, 10, 10),
                 embed_dim: int = 8, hidden: Sequence[int] = (64, 32), num_wide: int = 0,
                 fused: bool = True):
        super().__init__()
        self.cardinalities = list(cardinalities)
        self.num_wide = num_wide
        self.embeddings = nn.ModuleList(nn.Embedding(c, embed_dim) for c in cardinalities)
        # wide: dense + one-hot categoricals (an embedding of dim 1 is a one-hot linear) + extras
        self.wide_dense = nn.Linear(num_dense + num_wide, 1)
        self.wide_cat = nn.ModuleList(nn.Embedding(c, 1) for c in cardinalities)
        deep_in = num_dense + embed_dim * len(self.cardinalities)
        self.deep = nn.Sequential(*_dense_stack([deep_in, *hidden]), nn.Linear(hidden[-1], 1))

    def forward(self, dense, categorical, wide=None):
        if categorical.dim() != 2 or categorical.shape[1] != len(self.cardinalities):
            raise ValueError(f"WideDeep: categorical must be [B, {len(self.cardinalities)}], "
                             f"got {tuple(categorical.shape)}")
        if (wide is None) != (self.num_wide == 0):
            raise ValueError(f"WideDeep: expected {self.num_wide} wide features, got "
                             f"{'none' if wide is None else tuple(wide.shape)}")
        wide_in = dense if wide is None else torch.cat([dense, wide], dim=1)
        out = self.wide_dense(wide_in)
        for i, emb in enumerate(self.wide_cat):
            out = out + emb(categorical[:, i])
        deep_in = torch.cat([dense] + [e(categorical[:, i]) for i, e in enumerate(self.embeddings)], 1)
        return (out + self.deep(deep_in)).squeeze(-1)
