"""The training tasks: which model, which data, which loss and metrics (``fastbig train --list``)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .. import data as D


class UsageError(Exception):
    """A bad option, model name or checkpoint: one line on stderr, exit code 2."""



@dataclasses.dataclass
class Task:
    build: Callable[[bool], nn.Module]          # fused -> model
    data: Callable[[int, Optional[int]], Dict[str, D.Split]]   # (seed, limit) -> splits
    kind: str                                   # classify | binary | seq2seq | recon | gan
    metric: str                                 # the validation metric --tune selects on
    higher_better: bool
    defaults: dict
    about: str


def _digits_rows(seed=0, limit=None):
    """digits as sequences: 8 tokens (rows) of 8 features."""
    return {k: (x.squeeze(1), y) for k, (x, y) in D.digits(seed=seed, limit=limit).items()}


def _tasks() -> Dict[str, Task]:
    from .. import models as M

    cls = dict(optimizer="adam", lr_schedule="cosine", weight_decay=0.0)
    return {
        "mnistnet": Task(lambda f: M.MNISTNet(in_channels=1, num_classes=10, image_size=8, fused=f),
                         D.digits, "classify", "acc", True,
                         dict(cls, epochs=12, batch_size=32, lr=2e-3),
                         "Keras MNIST network on the 8x8 digits"),
        "simplecnn": Task(lambda f: M.SimpleCNN(in_channels=1, num_classes=10, image_size=8, fused=f),
                          D.digits, "classify", "acc", True,
                          dict(cls, epochs=10, batch_size=32, lr=2e-3), "SimpleCNN on digits"),
        "bigmodel": Task(lambda f: M.BigModel(in_channels=1, num_classes=10, image_size=8, fused=f),
                         D.digits, "classify", "acc", True,
                         dict(cls, epochs=8, batch_size=32, lr=1e-3), "BigModel on digits"),
        "mlp": Task(lambda f: M.MLP(in_features=64, fused=f), D.digits, "classify", "acc", True,
                    dict(cls, epochs=30, batch_size=32, lr=3e-3), "MLP 64-64-64-10 on digits"),
        "resnet18": Task(lambda f: M.resnet18(width=16, in_channels=1, num_classes=10,
                                              small_input=True, fused=f),
                         D.digits, "classify", "acc", True,
                         dict(cls, epochs=8, batch_size=32, lr=2e-3), "ResNet-18 (width 16) on digits"),
        "resnet34": Task(lambda f: M.resnet34(width=8, in_channels=1, num_classes=10,
                                              small_input=True, fused=f),
                         D.digits, "classify", "acc", True,
                         dict(cls, epochs=8, batch_size=32, lr=2e-3), "ResNet-34 (width 8) on digits"),
        "autoencoder": Task(lambda f: M.Autoencoder(in_features=64, hidden=(32,), latent=16, fused=f),
                            D.digits, "recon", "mse", False,
                            dict(cls, epochs=40, batch_size=32, lr=3e-3), "autoencoder on digits"),
        "dcgan": Task(lambda f: M.DCGAN(nz=16, ngf=32, ndf=32, nc=1, image_size=8, fused=f),
                      D.digits, "gan", "d_acc", True,
                      dict(optimizer="adam", lr_schedule="step", weight_decay=0.0, epochs=30,
                           batch_size=64, lr=2e-4), "DCGAN on digits (writes samples.png)"),
        "lstm": Task(lambda f: M.LSTMClassifier(input_size=1, hidden_size=64, num_layers=2,
                                                num_classes=2, fused=f),
                     D.seq_sum, "classify", "acc", True,
                     dict(cls, epochs=10, batch_size=64, lr=3e-3), "2-layer LSTM: is the sum > 0?"),
        "selfattention": Task(lambda f: M.SelfAttentionClassifier(input_size=8, embed_dim=64,
                                                                  num_classes=10, max_len=8, fused=f),
                              _digits_rows, "classify", "acc", True,
                              dict(cls, epochs=30, batch_size=32, lr=2e-3),
                              "self-attention classifier on digits (rows as tokens)"),
        "transformer": Task(lambda f: M.Transformer(src_vocab=12, d_model=64, nhead=4,
                                                    num_encoder_layers=2, num_decoder_layers=2,
                                                    dim_feedforward=128, dropout=0.0, max_len=16,
                                                    fused=f),
                            D.copy_task, "seq2seq", "acc", True,
                            dict(cls, epochs=12, batch_size=64, lr=3e-3, lr_schedule="onecycle"),
                            "encoder-decoder Transformer: copy 10 tokens"),
        "bert": Task(lambda f: M.BertEncoder(vocab_size=8, hidden_size=64, num_layers=2, num_heads=4,
                                             intermediate_size=128, max_position=32, dropout=0.0,
                                             num_classes=4, fused=f),
                     D.majority, "classify", "acc", True,
                     dict(cls, epochs=15, batch_size=64, lr=1e-3),
                     "BERT encoder (tiny): which token occurs most (padded, masked)"),
        "widedeep": Task(lambda f: M.WideDeep(num_dense=4, cardinalities=(10, 10, 10), embed_dim=8,
                                              hidden=(64, 32), fused=f),
                         D.clicks, "binary", "acc", True,
                         dict(cls, epochs=8, batch_size=256, lr=3e-3),
                         "Wide&Deep on synthetic clicks"),
    }



# ---------------------------------------------------------------------------------------------
# Loss and metrics per kind
# ---------------------------------------------------------------------------------------------
def _loss(kind, model, batch):
    if kind == "classify":
        *inputs, y = batch
        return F.cross_entropy(model(*inputs), y)
    if kind == "binary":
        *inputs, y = batch
        return F.binary_cross_entropy_with_logits(model(*inputs), y)
    if kind == "seq2seq":
        src, tgt_in, tgt_out = batch
        logits = model(src, tgt_in)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
    if kind == "recon":
        x = batch[0]
        return F.mse_loss(model(x), x)
    raise AssertionError(kind)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, split: D.Split, batch_size: int, device) -> dict:
    """Metrics of ``model`` on one split (eval mode)."""
    was = model.training
    model.eval()
    tot = {}
    n = 0

    def add(k, v, w):
        tot[k] = tot.get(k, 0.0) + float(v) * w

    try:
        for batch in D.batches(split, batch_size, device=device):
            b = batch[0].shape[0]
            if task.kind == "classify":
                *inputs, y = batch
                logits = model(*inputs)
                add("loss", F.cross_entropy(logits, y), b)
                add("acc", (logits.argmax(-1) == y).float().mean(), b)
            elif task.kind == "binary":
                *inputs, y = batch
                logits = model(*inputs)
                add("loss", F.binary_cross_entropy_with_logits(logits, y), b)
                add("acc", ((logits > 0).float() == y).float().mean(), b)
            elif task.kind == "seq2seq":
                src, tgt_in, tgt_out = batch
                logits = model(src, tgt_in)
                add("loss", F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1)), b)
                pred = model.greedy_decode(src, D.BOS, tgt_out.shape[1])  # autoregressive, honest
                add("acc", (pred == tgt_out).float().mean(), b)
                add("seq_acc", (pred == tgt_out).all(dim=1).float().mean(), b)
            elif task.kind == "recon":
                x = batch[0]
                add("mse", F.mse_loss(model(x), x), b)
            elif task.kind == "gan":
                real = batch[0] * 2 - 1
                G, Dn = model.generator, model.discriminator
                z = torch.randn(b, model.nz, device=real.device)
                d_real, d_fake = Dn(real), Dn(G(z))
                add("d_loss", F.binary_cross_entropy(d_real, torch.ones_like(d_real))
                    + F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake)), b)
                add("g_loss", F.binary_cross_entropy(d_fake, torch.ones_like(d_fake)), b)
                # how well D tells real from fake (0.5 = it cannot)
                add("d_acc", 0.5 * ((d_real > 0.5).float().mean() + (d_fake < 0.5).float().mean()), b)
            n += b
    finally:
        model.train(was)
    return {k: v / max(n, 1) for k, v in tot.items()}



def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
