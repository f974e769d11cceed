"""Model cases: whole fastbig.models networks, fused=True against fused=False (plain torch.nn
layers) and its torch.compile; a train step (forward + backward) and inference.

Work: not counted (the table gives times and ratios only).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ._base import Case, Impl, _compile, _fastbig, _load, _module_run, _skip, _smoke, randn


# ---- the cases ----------------------------------------------------------------------------
# name -> (class in fastbig.models, constructor kwargs, input shape after the batch, batch on CPU)
MODEL_SPECS = {
    "MNISTNet": ("MNISTNet", dict(image_size=28), (1, 28, 28), 64),
    "LSTMClassifier": ("LSTMClassifier", dict(input_size=32, hidden_size=128, num_layers=2,
                                              num_classes=10), (50, 32), 32),
    "ResNet-small": ("ResNet", dict(layers=(1, 1, 1, 1), width=16, num_classes=10,
                                    small_input=True), (3, 32, 32), 16),
}
QUICK_MODELS = ("MNISTNet", "LSTMClassifier")


def _no_dropout(m: nn.Module) -> nn.Module:
    """Dropout p -> 0, so the fused, unfused and float64 runs are comparable (keys unchanged)."""
    for mod in m.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.p = 0.0
        elif isinstance(getattr(mod, "dropout", None), float):     # nn.LSTM and its twins
            mod.dropout = 0.0
    return m


def model_case(model_name, mode, *, batch=None, compile_ok=True, compile_skip_reason="",
               kwargs=None, shape=None) -> Case:
    cls_name, kw, shp, default_b = MODEL_SPECS[model_name]
    kwargs = kw if kwargs is None else kwargs
    shape = shp if shape is None else shape
    B = batch or default_b
    bwd = mode == "fwd+bwd"

    def cls():
        return getattr(_fastbig().models, cls_name)

    def model(fused, dtype, device, state):
        m = _no_dropout(_load(cls()(fused=fused, **kwargs), state, dtype, device))
        return m.train() if bwd else m.eval()

    def make(device, dtype, gen):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)                 # the model's own init, reproducibly
            ref = cls()(fused=False, **kwargs)
        state = {k: v.detach().to(torch.float64).clone() if v.is_floating_point() else v.clone()
                 for k, v in ref.state_dict().items()}
        inp = {"x": randn((B,) + tuple(shape), dtype, device, gen, requires_grad=bwd),
               "state": state, "dtype": dtype, "device": device}
        if bwd:
            with torch.no_grad():
                out = model(False, torch.float64, device, state)(inp["x"].detach().double())
            inp["grad_out"] = randn(tuple(out.shape), dtype, device, gen)
        return inp

    def call(mod, inp):
        return [mod(inp["x"])]

    def build(fused, reference=False, compiled=False):
        def b(inp):
            mod = model(fused, inp["dtype"], inp["device"], inp["state"])
            if compiled:
                mod = _compile(mod)
            ctx = (lambda: _fastbig().backends.use("reference")) if reference else None
            return _module_run(inp, mod, call, bwd, ctx, check_grads=False)
        return b

    def oracle(inp):
        mod = model(False, torch.float64, inp["device"], inp["state"])
        return _module_run(inp, mod, call, bwd, check_grads=False)()

    impls = [
        Impl("fastbig", "fastbig", build(True), note="fused=True"),
        Impl("fastbig-ref", "reference", build(True, reference=True)),
        Impl("torch.nn", "baseline", build(False), note="fused=False"),
        Impl("compile(torch.nn)", "baseline", build(False, compiled=True), compiled=True),
    ]
    name = f"{model_name} {'train step' if bwd else 'inference'} B{B}"
    c = Case("models", name, mode, dict(model=model_name, B=B, **kwargs), make, oracle, impls, 0.0,
             "", eager="torch.nn", size=B, compile_ok=compile_ok,
             compile_skip_reason=compile_skip_reason)
    if bwd:
        c.note = ("train step: forward + backward timed; the check compares the logits only "
                  "(ReLU kinks deep in a net make fp32 gradients vs float64 ill-conditioned); "
                  "dropout p set to 0")
    else:
        c.note = "dropout p set to 0 (eval mode anyway)"
    return c


# ---- the tables ----------------------------------------------------------------------------
def cpu_cases(quick: bool) -> List[Case]:
    return [model_case(m, mode, **_skip(quick)) for m in (QUICK_MODELS if quick else MODEL_SPECS)
            for mode in ("fwd+bwd", "infer")]


def gpu_cases(quick: bool) -> List[Case]:
    return [model_case(m, mode, batch=256) for m in MODEL_SPECS for mode in ("fwd+bwd", "infer")]


def smoke_cases() -> List[Case]:
    return [model_case("MNISTNet", "fwd+bwd", batch=2, kwargs=dict(image_size=8), shape=(1, 8, 8),
                       **_smoke())]
