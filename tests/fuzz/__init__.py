"""Seeded random cases for every fastbig op, shared by tests/test_fuzz.py and long runs.

A case is drawn from ``random.Random(seed)`` (shapes, dtypes, flags, memory layout, backend) and its
tensors from ``torch.Generator().manual_seed(seed)``; so ``(op, seed)`` replays it exactly:

    python tests/fuzz attention 1234         # prints the parameters and every error

Each runner runs fastbig's op forward AND backward on the case's inputs and the float64 oracle of
fastbig/reference/ on the same inputs (cast to float64), and returns the comparisons
``(name, out, ref, dtype, tf32)``; the test bounds each by tests/conftest.py's ``tol``.
An op this machine cannot run (the Triton kernels without a GPU or the interpreter) says why
through its ``available``; the test skips it with that reason.

One module an op (its generator, its runner and its ``register(OpSpec(...))``), imported below;
``_common`` holds the tensor helpers and error bounds they share, ``_registry`` the registry and
the replay, ``modules`` the tiny fastbig.nn modules and models other tests share. This folder is
imported as the package ``fuzz`` from tests/ (on sys.path under pytest, and in ``__main__``).
"""
import os

import torch

if not torch.cuda.is_available():  # before fastbig defines its Triton kernels (as tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ._registry import OPS, Check, OpSpec, case_params, register, run_case, seeds  # noqa: E402,F401

# The op modules, one line each: importing one registers its ops, in this order (test_fuzz's order).
from . import lstm_cell  # noqa: E402,F401  lstm_cell, lstm_cell_step
from . import attention  # noqa: E402,F401  attention, attention_triton
from . import lstm  # noqa: E402,F401
from . import conv_bn_act  # noqa: E402,F401

from .modules import model_cases, module_cases  # noqa: E402,F401
