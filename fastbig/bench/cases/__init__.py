"""The benchmark cases, one module per op, shared by the harness (``fastbig bench``) and the
pytest-benchmark suites in bench/.

    _base.py         Case, Impl, Goal, NotAvailable and the op-independent helpers
    attention.py     fastbig.ops.attention vs eager, SDPA (each backend), torch.compile, FlexAttention
    lstm.py          fastbig.nn.LSTM / LSTMCell vs torch.nn (oneDNN/cuDNN and native), torch.compile
    conv_bn_relu.py  fastbig.nn.ConvBnReLU2d and ops.bn_act vs torch.nn / eager, torch.compile
    models.py        fastbig.models, fused=True vs fused=False, torch.compile
    transformers.py  Hugging Face Llama through fastbig.accelerate (asked for by name only)

Each op module holds its case builders, its work count and its three tables:
``cpu_cases(quick)``, ``gpu_cases(quick)`` and ``smoke_cases()`` (tiny shapes for the test
suite). Adding an op: one new module here, one line in ``_MODULES`` below.
"""
from __future__ import annotations

from typing import List

from . import attention, conv_bn_relu, lstm, models, transformers
from ._base import (KINK_MARGIN, QUICK_COMPILE, TOL, TOL_TRITON_TF32, Case, Goal, Impl,
                    NotAvailable, fwd_bwd, kink_safe_grad, randn, to64, tolerance)
from .attention import GPU_COMPILE_SEQS, attention_case, attention_eager, attention_flops
from .conv_bn_relu import bn_act_case, conv_case, conv_flops
from .lstm import lstm_case, lstm_cell_loop_case, lstm_flops
from .models import MODEL_SPECS, QUICK_MODELS, model_case
from .transformers import decode_case, hf_cases, prefill_case

# op name -> its module, in the order of "all"
_MODULES = {
    "attention": attention,
    "lstm": lstm,
    "conv_bn_relu": conv_bn_relu,
    "models": models,
}
# asked for by name only, not part of "all" (transformers is an optional dependency)
_EXTRA_MODULES = {
    "transformers": transformers,
}
OPS = tuple(_MODULES)
EXTRA_OPS = tuple(_EXTRA_MODULES)


def get_cases(op: str = "all", device: str = "cpu", *, quick: bool = False,
              smoke: bool = False) -> List[Case]:
    """The cases of ``op`` ('all' for every op) on ``device``; quick/smoke are smaller runs."""
    ops = OPS if op == "all" else (op,)
    for o in ops:
        if o not in OPS + EXTRA_OPS:
            raise ValueError(f"op: expected one of {OPS + EXTRA_OPS + ('all',)}, got {o!r}")
    cases: List[Case] = []
    for o in ops:
        mod = _MODULES.get(o) or _EXTRA_MODULES[o]
        if smoke:
            cases += mod.smoke_cases()
        elif device == "cuda":
            cases += mod.gpu_cases(quick)
        else:
            cases += mod.cpu_cases(quick)
    return cases


__all__ = [
    "OPS", "EXTRA_OPS", "get_cases",
    "Case", "Goal", "Impl", "NotAvailable", "TOL", "TOL_TRITON_TF32", "to64", "tolerance",
    "randn", "KINK_MARGIN", "kink_safe_grad", "fwd_bwd", "QUICK_COMPILE", "GPU_COMPILE_SEQS",
    "attention_case", "attention_flops", "attention_eager",
    "lstm_case", "lstm_cell_loop_case", "lstm_flops",
    "conv_case", "conv_flops", "bn_act_case",
    "model_case", "MODEL_SPECS", "QUICK_MODELS",
    "prefill_case", "decode_case", "hf_cases",
]
