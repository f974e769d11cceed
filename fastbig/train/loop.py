"""The training loop: optimizers, schedules, one epoch, ``fit``."""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import List, Optional

import torch
from torch.nn import functional as F

from .. import data as D
from .._progress import Progress
from .checkpoint import save_checkpoint
from .tasks import UsageError, _fmt, _loss, _tasks, evaluate


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
        rate = n / max(time.perf_counter() - progress.t0, 1e-9)
        progress.update(f"loss {loss:.4f} {rate:,.0f} samples/s", 1)
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
    model = task.build(cfg["fused"]).to(device)
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
        prog = Progress(steps, f"epoch {epoch + 1}/{cfg['epochs']}", enabled=verbose and progress, lines="last",
                        clock=False, min_interval=0.1)
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
