"""Datasets for the training workflow, all in memory, all seeded.

* ``digits``: scikit-learn's handwritten digits (8x8, 1797 images, shipped with the package, no
  download), pixels scaled to [0, 1], split train/val/test with a seeded permutation.
* ``seq_sum``: sequences of N(0, 1) numbers; the label is whether the sum is positive (LSTM).
* ``copy``: token sequences to copy (Transformer encoder-decoder).
* ``majority``: padded token sequences; the label is the token that occurs most (BERT encoder).
* ``clicks``: a synthetic click-through data set from a known logistic model with a feature cross
  (Wide&Deep).

Each builder returns {"train": Split, "val": Split, "test": Split}; a Split is a tuple of tensors
(inputs..., target) of equal length. ``batches`` iterates over one.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

Split = Tuple[torch.Tensor, ...]

BOS = 1  # copy task: 0 = padding (unused), 1 = begin-of-sequence, 2.. = symbols
PAD = 0  # majority task: 0 = padding, 1 = [CLS], 2.. = symbols


def _split(tensors: Split, seed: int, val_frac: float, test_frac: float,
           limit: Optional[int] = None) -> Dict[str, Split]:
    n = tensors[0].shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_frac))
    n_val = int(round(n * val_frac))
    idx = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    out = {}
    for k, ix in idx.items():
        if limit is not None:
            ix = ix[:limit]
        out[k] = tuple(t[ix] for t in tensors)
    return out


def digits(seed: int = 0, limit: Optional[int] = None, val_frac: float = 0.15,
           test_frac: float = 0.2) -> Dict[str, Split]:
    """sklearn's 8x8 digits as ([N, 1, 8, 8] float32 in [0, 1], [N] long)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError("the digits data set needs scikit-learn: pip install scikit-learn "
                           "(or pip install 'fastbig[demo]')") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    return _split((x, y), seed, val_frac, test_frac, limit)


def seq_sum(seed: int = 0, n: int = 6000, length: int = 16, limit: Optional[int] = None) -> Dict[str, Split]:
    """([N, length, 1] float32, [N] long): label 1 when the sequence sums to a positive number."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, length, 1, generator=g)
    y = (x.sum(dim=(1, 2)) > 0).long()
    return _split((x, y), seed, 0.15, 0.15, limit)


def copy_task(seed: int = 0, n: int = 6000, length: int = 10, vocab: int = 12,
              limit: Optional[int] = None) -> Dict[str, Split]:
    """(src [N, L], tgt_in [N, L], tgt_out [N, L]) long: tgt_out == src, tgt_in = BOS + src[:-1]."""
    g = torch.Generator().manual_seed(seed + 2)
    src = torch.randint(2, vocab, (n, length), generator=g)
    tgt_in = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), src[:, :-1]], dim=1)
    return _split((src, tgt_in, src.clone()), seed, 0.15, 0.15, limit)


def majority(seed: int = 0, n: int = 6000, max_len: int = 16, num_symbols: int = 4,
             limit: Optional[int] = None) -> Dict[str, Split]:
    """(ids [N, 1 + max_len] long, attention_mask [N, 1 + max_len] long, label [N] long).

    ids[:, 0] is [CLS]; then a random number (4..max_len) of symbols 2..2+num_symbols-1, then
    padding (0). The label (0..num_symbols-1) is the symbol that occurs most; sequences whose top
    count is tied are redrawn, so the label is unique."""
    g = torch.Generator().manual_seed(seed + 3)
    ids = torch.full((n, 1 + max_len), PAD, dtype=torch.long)
    mask = torch.zeros(n, 1 + max_len, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    ids[:, 0] = 1
    mask[:, 0] = 1
    i = 0
    while i < n:
        L = int(torch.randint(4, max_len + 1, (1,), generator=g))
        s = torch.randint(0, num_symbols, (L,), generator=g)
        counts = torch.bincount(s, minlength=num_symbols)
        top = counts.max()
        if int((counts == top).sum()) != 1:
            continue
        ids[i, 1:1 + L] = s + 2
        mask[i, 1:1 + L] = 1
        labels[i] = int(counts.argmax())
        i += 1
    return _split((ids, mask, labels), seed, 0.15, 0.15, limit)


def clicks(seed: int = 0, n: int = 20000, num_dense: int = 4, cardinalities=(10, 10, 10),
           limit: Optional[int] = None) -> Dict[str, Split]:
    """(dense [N, num_dense] float32, categorical [N, F] long, clicked [N] float32).

    Clicks are drawn from a known logistic model: a linear term in the dense features, one
    effect per category value, and a cross effect of the first two fields (which the deep part
    can learn and a purely linear model cannot)."""
    g = torch.Generator().manual_seed(seed + 4)
    dense = torch.randn(n, num_dense, generator=g)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cardinalities], dim=1)
    w = torch.randn(num_dense, generator=g)
    effects = [torch.randn(c, generator=g) for c in cardinalities]
    cross = 2.0 * torch.randn(cardinalities[0], cardinalities[1], generator=g)
    logit = dense @ w + sum(e[cat[:, i]] for i, e in enumerate(effects)) + cross[cat[:, 0], cat[:, 1]]
    y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return _split((dense, cat, y), seed, 0.15, 0.15, limit)


def batches(split: Split, batch_size: int, *, shuffle: bool = False,
            generator: Optional[torch.Generator] = None, device=None) -> Iterator[Split]:
    n = split[0].shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        ix = order[start:start + batch_size]
        yield tuple(t[ix].to(device) if device is not None else t[ix] for t in split)
