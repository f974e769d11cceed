"""Training checkpoints: what ``fastbig train`` saves after every epoch and ``fastbig evaluate``
and ``--resume`` load.

A checkpoint holds: model, optimizer(s), scheduler(s), config, epoch, history, fastbig version.
"""
from __future__ import annotations

import os

import torch

from .tasks import UsageError, _tasks

CKPT_FORMAT = 1


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
    from .. import __version__
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
