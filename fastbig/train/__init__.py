"""The training workflow: ``fastbig train MODEL`` prepares the data, trains (optionally after a small
hyper-parameter search, ``--tune``), evaluates on the validation split every epoch, scores the test
split and saves a checkpoint that ``fastbig evaluate CKPT`` reloads and ``--resume`` continues.

Models (``fastbig train --list``): digits classifiers (mnistnet, simplecnn, bigmodel, mlp,
resnet18, resnet34), autoencoder and dcgan on the digits, lstm (is the sum positive?),
selfattention (digits, one image row per token), transformer (copy), bert (majority token) and
widedeep (synthetic clicks).

``demo_main()`` trains MNISTNet through fastbig's fused layers and through the torch.nn twin and
prints test accuracy and time per epoch for both.

The package: ``tasks`` (the models, their data, loss and metrics), ``loop`` (optimizers,
schedules, the epoch, ``fit``), ``checkpoint`` (save and load), ``commands`` (the command line).
"""
from .._progress import Progress  # noqa: F401
from .checkpoint import CKPT_FORMAT, load_checkpoint, save_checkpoint  # noqa: F401
from .commands import demo_main, evaluate_checkpoint, evaluate_main, main  # noqa: F401
from .loop import fit  # noqa: F401
from .tasks import Task, UsageError, evaluate  # noqa: F401

__all__ = ["CKPT_FORMAT", "Progress", "Task", "UsageError", "demo_main", "evaluate", "evaluate_checkpoint",
           "evaluate_main", "fit", "load_checkpoint", "main", "save_checkpoint"]
