"""The training workflow: ``fastbig train MODEL`` prepares the data, trains (optionally after a small
hyper-parameter search, ``--tune``), evaluates on the validation split every epoch, scores the test
split and saves a checkpoint that ``fastbig evaluate CKPT`` reloads and ``--resume`` continues.

Models (``fastbig train --list``): digits classifiers (mnistnet, simplecnn, bigmodel, mlp,
resnet18, resnet34), autoencoder and dcgan on the digits, lstm (is the sum positive?),
selfattention (digits, one image row per token), transformer (copy), bert (majority token) and
widedeep (synthetic clicks).

A checkpoint holds: model, optimizer(s), scheduler(s), config, epoch, history, fastbig version.
``demo_main()`` trains MNISTNet through fastbig's fused layers and through the torch.nn twin and
prints test accuracy and time per epoch for both.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import data as D

CKPT_FORMAT = 1


class UsageError(Exception):
    """A bad option, model name or checkpoint: one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Tasks: which model, which data, which loss and metrics
# ---------------------------------------------------------------------------------------------
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
    from . import models as M

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


# ---------------------------------------------------------------------------------------------
# Optimizers, schedules, progress
# ---------------------------------------------------------------------------------------------
def _optimizers(task, model, cfg) -> List[torch.optim.Optimizer]:
    def make(params):
        if cfg["optimizer"] == "adam":
            betas = (0.5, 0.999) if task.kind == "gan" else (0.9, 0.999)
            return torch.optim.Adam(params, lr=cfg["lr"], betas=betas, weight_decay=cfg["weight_decay"])
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, nesterov=True,
                               weight_decay=cfg["weight_decay"])

    if task.kind == "gan":
        return [make(model.generator.parameters()), make(model.discriminator.parameters())]
    return [make(model.parameters())]


def _scheduler(opt, cfg, steps_per_epoch):
    total = max(1, cfg["epochs"] * steps_per_epoch)
    s = cfg["lr_schedule"]
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, total // 3), gamma=0.1)
    if s == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if s == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total + 1)
    raise AssertionError(s)


class Progress:
    """A one-line progress bar on stderr: redrawn in place on a terminal, printed once per epoch
    otherwise (so logs stay readable)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.samples = 0

    def update(self, step: int, loss: float, samples: int):
        self.samples += samples
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and (now - self.last > 0.1 or step == self.total):
            self.last = now
            self.stream.write("\r" + self._line(step, loss, now))
            self.stream.flush()
        self._loss = loss

    def _line(self, step, loss, now):
        width = 24
        done = int(width * step / max(self.total, 1))
        rate = self.samples / max(now - self.t0, 1e-9)
        return (f"{self.label} [{'#' * done}{'.' * (width - done)}] {step}/{self.total} "
                f"loss {loss:.4f} {rate:,.0f} samples/s")

    def close(self):
        if not self.enabled:
            return
        now = time.perf_counter()
        line = self._line(self.total, getattr(self, "_loss", float("nan")), now)
        self.stream.write(("\r" + line + "\n") if self.tty else (line + "\n"))
        self.stream.flush()


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _train_epoch(task, model, opts, scheds, split, cfg, device, gen, progress) -> float:
    model.train()
    total, n = 0.0, 0
    for step, batch in enumerate(D.batches(split, cfg["batch_size"], shuffle=True, generator=gen,
                                           device=device), 1):
        b = batch[0].shape[0]
        if task.kind == "gan":
            loss = _gan_step(model, opts, batch[0] * 2 - 1)
        else:
            opt = opts[0]
            opt.zero_grad(set_to_none=True)
            loss_t = _loss(task.kind, model, batch)
            if not torch.isfinite(loss_t):
                raise RuntimeError(f"training diverged: loss is {loss_t.item()} at step {step} "
                                   f"(try a smaller --lr)")
            loss_t.backward()
            opt.step()
            loss = loss_t.item()
        for s in scheds:
            s.step()
        total += loss * b
        n += b
        progress.update(step, loss, b)
    progress.close()
    return total / max(n, 1)


def _gan_step(model, opts, real) -> float:
    G, Dn = model.generator, model.discriminator
    opt_g, opt_d = opts
    b = real.shape[0]
    z = torch.randn(b, model.nz, device=real.device)
    fake = G(z)
    opt_d.zero_grad(set_to_none=True)
    d_real, d_fake = Dn(real), Dn(fake.detach())
    loss_d = (F.binary_cross_entropy(d_real, torch.full_like(d_real, 0.9))   # one-sided smoothing
              + F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake)))
    loss_d.backward()
    opt_d.step()
    opt_g.zero_grad(set_to_none=True)
    d_out = Dn(fake)
    loss_g = F.binary_cross_entropy(d_out, torch.ones_like(d_out))
    loss_g.backward()
    opt_g.step()
    return float(loss_d.item() + loss_g.item())


def _check_out_dir(out: str) -> None:
    """--out must be a folder that can be created and written: say so now, not after training."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out!r}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out!r}: the folder is not writable")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device: expected auto, cpu or cuda[:N], got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu or cuda[:N], got {name!r}")
    return dev


def _build(task: Task, fused: bool, name: str) -> nn.Module:
    try:
        return task.build(fused)
    except ImportError as e:
        raise UsageError(f"{name}: {e}") from e


def fit(name: str, cfg: dict, *, splits=None, out: Optional[str] = None, state: Optional[dict] = None,
        verbose: bool = True, progress: bool = True, log=None) -> dict:
    """Train ``name`` with ``cfg``; returns {"model", "history", "val", "seconds_per_epoch", ...}.

    ``state`` is a loaded checkpoint to continue from. ``out``: folder for checkpoint.pt
    (written after every epoch)."""
    log = log or (lambda *a: print(*a, flush=True))
    task = _tasks()[name]
    device = _resolve_device(cfg["device"])
    if splits is None:
        splits = task.data(seed=cfg["seed"], limit=cfg.get("limit"))
    torch.manual_seed(cfg["seed"])
    model = _build(task, cfg["fused"], name).to(device)
    opts = _optimizers(task, model, cfg)
    steps = math.ceil(splits["train"][0].shape[0] / cfg["batch_size"])
    start, history = 0, []
    if state is None:
        scheds = [_scheduler(o, cfg, steps) for o in opts]
    else:
        model.load_state_dict(state["model"], strict=True)
        for o, s in zip(opts, state["optimizers"]):
            o.load_state_dict(s)
        start, history = state["epoch"], list(state.get("history", []))
        if state["config"]["epochs"] == cfg["epochs"]:
            lrs = [[g["lr"] for g in o.param_groups] for o in opts]
            scheds = [_scheduler(o, cfg, steps) for o in opts]
            for sc, s in zip(scheds, state["schedulers"]):
                sc.load_state_dict(s)
            for o, lr in zip(opts, lrs):  # a scheduler's constructor may have reset them
                for g, v in zip(o.param_groups, lr):
                    g["lr"] = v
        else:  # a longer run: the schedule is rebuilt for the new length and fast-forwarded
            for o in opts:
                for g in o.param_groups:
                    g["lr"] = g.get("initial_lr", cfg["lr"])
            scheds = [_scheduler(o, cfg, steps) for o in opts]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for sc in scheds:
                    for _ in range(start * steps):
                        sc.step()
    times = []
    val = history[-1]["val"] if history else {}
    for epoch in range(start, cfg["epochs"]):
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
        prog = Progress(steps, f"epoch {epoch + 1}/{cfg['epochs']}", enabled=verbose and progress)
        t0 = time.perf_counter()
        train_loss = _train_epoch(task, model, opts, scheds, splits["train"], cfg, device, gen, prog)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        val = evaluate(task, model, splits["val"], max(cfg["batch_size"], 256), device)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val": val, "seconds": dt})
        if verbose:
            log(f"epoch {epoch + 1}/{cfg['epochs']}  train_loss {train_loss:.4f}  "
                f"val: {_fmt(val)}  ({dt:.2f} s)")
        if out:
            save_checkpoint(os.path.join(out, "checkpoint.pt"), name, cfg, model, opts, scheds,
                            epoch + 1, history)
    return {"model": model, "history": history, "val": val, "task": task, "splits": splits,
            "device": device, "seconds_per_epoch": (sum(times) / len(times)) if times else float("nan")}


def save_checkpoint(path, name, cfg, model, opts, scheds, epoch, history):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = {"format": CKPT_FORMAT, "model_name": name, "config": dict(cfg), "epoch": epoch,
            "model": model.state_dict(), "optimizers": [o.state_dict() for o in opts],
            "schedulers": [s.state_dict() for s in scheds], "history": history,
            "fastbig_version": _version()}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _version():
    from . import __version__
    return __version__


def load_checkpoint(path: str) -> dict:
    """Load and validate a checkpoint; UsageError (one line) when missing or corrupt."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"checkpoint {path!r} is not a readable fastbig checkpoint ({first})") from None
    need = ("format", "model_name", "config", "epoch", "model", "optimizers", "schedulers")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        raise UsageError(f"checkpoint {path!r} is not a fastbig training checkpoint "
                         f"(expected keys {', '.join(need)})")
    if ckpt["model_name"] not in _tasks():
        raise UsageError(f"checkpoint {path!r} is for unknown model {ckpt['model_name']!r}")
    return ckpt


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (raised to main)
        raise UsageError(message)


def _arg_type(cast, ok, expected):
    """An argparse type: cast the string, then require ok(value); the error says what was expected."""
    def parse(s):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v
    return parse


_positive_int = _arg_type(int, lambda v: v >= 1, "a positive integer")
_positive_float = _arg_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_nonneg_float = _arg_type(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")


def _train_parser():
    p = _Parser(prog="fastbig train", description="Train a model end to end: data, training, "
                "validation, optional tuning, test score, checkpoint.")
    p.add_argument("model", nargs="?", help="model name (see --list)")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--optimizer", choices=("adam", "sgd"))
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--lr-schedule", choices=("step", "cosine", "onecycle"))
    p.add_argument("--weight-decay", type=_nonneg_float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda", "cpu"),
                   help="force a fastbig backend (default: FASTBIG_BACKEND or auto)")
    p.add_argument("--out", help="folder for checkpoint.pt and metrics.json (default runs/MODEL)")
    p.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint")
    p.add_argument("--fused", dest="fused", action="store_true", default=None,
                   help="fastbig's fused layers (default)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="the plain torch.nn twin, for comparison")
    p.add_argument("--tune", action="store_true",
                   help="grid over lr x batch size, best on the validation split, then train")
    p.add_argument("--tune-epochs", type=_positive_int,
                   help="epochs per tuning trial (default: a third of --epochs, at least 1)")
    p.add_argument("--limit", type=_positive_int,
                   help="use at most N examples per split (quick runs and tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (epoch lines stay)")
    return p


def _backend_ctx(name):
    import contextlib

    from . import backends
    return backends.use(name) if name else contextlib.nullcontext()


def _tune(name, cfg, splits, log) -> dict:
    task = _tasks()[name]
    lrs = [cfg["lr"] / 3, cfg["lr"], cfg["lr"] * 3]
    bss = sorted({max(1, cfg["batch_size"] // 2), cfg["batch_size"]})
    tune_epochs = cfg.get("tune_epochs") or max(1, cfg["epochs"] // 3)
    log(f"tuning {name}: lr in {', '.join(f'{v:.2e}' for v in lrs)} x batch size in "
        f"{', '.join(map(str, bss))}, {tune_epochs} epoch(s) each, on the validation split "
        f"({task.metric}, {'higher' if task.higher_better else 'lower'} is better)")
    best, rows = None, []
    for bs in bss:
        for lr in lrs:
            trial = dict(cfg, lr=lr, batch_size=bs, epochs=tune_epochs)
            r = fit(name, trial, splits=splits, verbose=False, log=log)
            score = r["val"].get(task.metric, float("nan"))
            rows.append((lr, bs, score))
            log(f"  lr {lr:.2e}  batch {bs:<4d}  val {task.metric} {score:.4f}")
            ok = math.isfinite(score)
            if ok and (best is None or (score > best[2] if task.higher_better else score < best[2])):
                best = (lr, bs, score)
    if best is None:
        raise RuntimeError("tuning: no trial gave a finite validation score")
    log(f"tuning picked lr {best[0]:.2e}, batch size {best[1]} (val {task.metric} {best[2]:.4f})")
    return dict(cfg, lr=best[0], batch_size=best[1])


def _write_png_grid(path, images: torch.Tensor, nrow: int = 8, scale: int = 4):
    """A grayscale PNG of images [N, 1, H, W] in [0, 1], no dependency beyond zlib."""
    import struct
    import zlib

    n, _, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    pad = 1
    H, W = nrows * (h + pad) + pad, ncol * (w + pad) + pad
    canvas = torch.zeros(H, W)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h,
               pad + c * (w + pad): pad + c * (w + pad) + w] = images[i, 0].float().cpu()
    canvas = canvas.clamp(0, 1).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    pix = (canvas * 255).round().to(torch.uint8).numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in pix)

    def chunk(tag, body):
        c = struct.pack(">I", len(body)) + tag + body
        return c + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", pix.shape[1], pix.shape[0], 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def _run_train(args, log) -> int:
    tasks = _tasks()
    if args.list:
        for k, t in tasks.items():
            log(f"{k:<14} {t.about}")
        return 0
    state = None
    if args.resume:
        state = load_checkpoint(args.resume)
        if args.model and args.model != state["model_name"]:
            raise UsageError(f"--resume: checkpoint is for model {state['model_name']!r}, "
                             f"not {args.model!r}")
        args.model = state["model_name"]
    if not args.model:
        raise UsageError("MODEL is required (see fastbig train --list)")
    if args.model not in tasks:
        raise UsageError(f"unknown model {args.model!r}; expected one of {', '.join(tasks)}")
    task = tasks[args.model]
    if state is not None:
        cfg = dict(state["config"])
        for k in ("batch_size", "optimizer", "lr", "lr_schedule", "weight_decay"):
            if getattr(args, k) is not None and getattr(args, k) != cfg[k]:
                raise UsageError(f"--resume: --{k.replace('_', '-')} differs from the checkpoint's "
                                 f"({cfg[k]!r}); resume keeps the checkpoint's training options")
        if args.fused is not None and args.fused != cfg["fused"]:
            raise UsageError("--resume: --fused/--no-fused differs from the checkpoint's")
        if args.epochs is not None:
            if args.epochs < state["epoch"]:
                raise UsageError(f"--epochs {args.epochs}: the checkpoint already has "
                                 f"{state['epoch']} epochs")
            if args.epochs != cfg["epochs"] and cfg["lr_schedule"] == "onecycle":
                raise UsageError("--resume: a onecycle schedule cannot be lengthened; "
                                 "keep --epochs as in the checkpoint")
            cfg["epochs"] = args.epochs
        if args.tune:
            raise UsageError("--tune cannot be combined with --resume")
        cfg["device"] = args.device
        cfg["backend"] = args.backend or cfg.get("backend")
        out = args.out or os.path.dirname(os.path.abspath(args.resume))
    else:
        cfg = dict(task.defaults)
        for k in ("epochs", "batch_size", "optimizer", "lr", "lr_schedule", "weight_decay"):
            if getattr(args, k) is not None:
                cfg[k] = getattr(args, k)
        cfg.update(model=args.model, seed=args.seed, device=args.device, backend=args.backend,
                   fused=True if args.fused is None else args.fused, limit=args.limit,
                   tune_epochs=args.tune_epochs)
        if args.tune and task.kind == "gan":
            raise UsageError("--tune: dcgan has no validation score to select on")
        out = args.out or os.path.join("runs", args.model)
    _resolve_device(cfg["device"])  # fail early on a bad --device
    _check_out_dir(out)  # ... and on an --out that cannot be written, before any training
    progress = not args.quiet
    with _backend_ctx(cfg.get("backend")):
        splits = task.data(seed=cfg["seed"], limit=cfg.get("limit"))
        if args.tune:
            cfg = _tune(args.model, cfg, splits, log)
        log(f"training {args.model} ({'fastbig fused layers' if cfg['fused'] else 'torch.nn twin'})"
            f" on {_resolve_device(cfg['device'])}: {cfg['epochs']} epochs, batch {cfg['batch_size']},"
            f" {cfg['optimizer']} lr {cfg['lr']:.2e} ({cfg['lr_schedule']}), "
            f"{splits['train'][0].shape[0]} training examples")
        r = fit(args.model, cfg, splits=splits, out=out, state=state, progress=progress, log=log)
        test = evaluate(task, r["model"], splits["test"], max(cfg["batch_size"], 256), r["device"])
    log(f"test: {_fmt(test)}")
    os.makedirs(out, exist_ok=True)
    if task.kind == "gan":
        g = torch.Generator().manual_seed(cfg["seed"])
        r["model"].eval()
        with _backend_ctx(cfg.get("backend")):
            imgs = (r["model"].sample(64, generator=g) + 1) / 2
        _write_png_grid(os.path.join(out, "samples.png"), imgs)
        log(f"wrote {os.path.join(out, 'samples.png')}")
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"model": args.model, "config": cfg, "test": test, "history": r["history"],
                   "seconds_per_epoch": r["seconds_per_epoch"]}, f, indent=1)
    if r["history"]:
        log(f"saved {os.path.join(out, 'checkpoint.pt')} (epoch {r['history'][-1]['epoch']})")
    return 0


def main(argv=None) -> int:
    """``fastbig train MODEL [options]``; returns the exit code (2 for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    try:
        args = _train_parser().parse_args(argv)
        return _run_train(args, log)
    except UsageError as e:
        print(f"fastbig train: error: {e}", file=sys.stderr)
        return 2


def _evaluate_parser():
    p = _Parser(prog="fastbig evaluate", description="Score a training checkpoint on its test split.")
    p.add_argument("checkpoint", help="checkpoint.pt written by fastbig train")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda", "cpu"))
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--fused", dest="fused", action="store_true", default=None,
                   help="load into the fastbig fused model")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="load into the torch.nn twin (same state_dict keys)")
    return p


def evaluate_checkpoint(path, *, device="auto", backend=None, batch_size=256, split="test",
                        fused=None) -> dict:
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    task = _tasks()[ckpt["model_name"]]
    dev = _resolve_device(device)
    fused = cfg["fused"] if fused is None else fused
    with _backend_ctx(backend or cfg.get("backend")):
        model = _build(task, fused, ckpt["model_name"])
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise UsageError(f"checkpoint {path!r}: weights do not fit {ckpt['model_name']} ({first})") from None
        model.to(dev)
        splits = task.data(seed=cfg["seed"], limit=cfg.get("limit"))
        return evaluate(task, model, splits[split], batch_size, dev)


def evaluate_main(argv=None) -> int:
    """``fastbig evaluate CKPT``: reload a checkpoint and score it on the test split."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _evaluate_parser().parse_args(argv)
        ckpt = load_checkpoint(args.checkpoint)
        m = evaluate_checkpoint(args.checkpoint, device=args.device, backend=args.backend,
                                batch_size=args.batch_size, split=args.split, fused=args.fused)
    except UsageError as e:
        print(f"fastbig evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"{ckpt['model_name']} (epoch {ckpt['epoch']}) {args.split}: {_fmt(m)}", flush=True)
    return 0


def demo_main(epochs: Optional[int] = None, limit: Optional[int] = None) -> int:
    """Train MNISTNet on the digits through fastbig's fused layers and through the torch.nn twin
    (same seed, data and options); print test accuracy and time per epoch side by side.
    (``epochs``/``limit`` shorten it for tests; the demo uses the defaults.)"""
    task = _tasks()["mnistnet"]
    cfg = dict(task.defaults, model="mnistnet", seed=0, device="auto", backend=None, limit=limit,
               tune_epochs=None)
    if epochs:
        cfg["epochs"] = epochs
    splits = task.data(seed=0, limit=limit)
    rows = []
    for fused in (True, False):
        label = "fastbig (fused)" if fused else "torch.nn twin"
        print(f"== MNISTNet on digits, {label}", flush=True)
        try:
            r = fit("mnistnet", dict(cfg, fused=fused), splits=splits, verbose=True)
        except UsageError as e:
            print(f"   skipped: {e}", flush=True)
            rows.append((label, None, None))
            continue
        test = evaluate(task, r["model"], splits["test"], 256, r["device"])
        rows.append((label, test["acc"], r["seconds_per_epoch"]))
    print(f"\nMNISTNet, 8x8 digits ({splits['test'][0].shape[0]} test images, "
          f"{cfg['epochs']} epochs, {_resolve_device('auto')})")
    print(f"  {'layers':<18} {'test acc':>9} {'s/epoch':>9}")
    for label, acc, spe in rows:
        if acc is None:
            print(f"  {label:<18} {'skipped':>9} {'':>9}")
        else:
            print(f"  {label:<18} {acc * 100:>8.2f}% {spe:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
