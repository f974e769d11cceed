"""The command line: ``fastbig train``, ``fastbig evaluate`` and the demo's training half."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

import torch

from .checkpoint import load_checkpoint
from .loop import _resolve_device, fit
from .tasks import UsageError, _fmt, _tasks, evaluate


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




def _backend_ctx(name):
    import contextlib

    from .. import backends
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
        model = task.build(fused)
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
        r = fit("mnistnet", dict(cfg, fused=fused), splits=splits, verbose=True)
        test = evaluate(task, r["model"], splits["test"], 256, r["device"])
        rows.append((label, test["acc"], r["seconds_per_epoch"]))
    print(f"\nMNISTNet, 8x8 digits ({splits['test'][0].shape[0]} test images, "
          f"{cfg['epochs']} epochs, {_resolve_device('auto')})")
    print(f"  {'layers':<18} {'test acc':>9} {'s/epoch':>9}")
    for label, acc, spe in rows:
        print(f"  {label:<18} {acc * 100:>8.2f}% {spe:>9.3f}")
    return 0

