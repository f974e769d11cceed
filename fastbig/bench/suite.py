"""The pytest-benchmark side of the cases (fastbig/bench/cases/): bench/test_bench_*.py call these.

    pytest bench/ --benchmark-only             the CPU cases of ``fastbig bench --quick``
    FASTBIG_BENCH_FULL=1 pytest bench/ ...     the full-size CPU cases

Every implementation is checked against the float64 oracle before pytest-benchmark times it
(a wrong one fails its test, with its error); one that cannot run here is skipped, saying so.
"""
from __future__ import annotations

import os

import torch

from . import cases as cases_mod
from .cases import NotAvailable, tolerance

_cache: dict = {}


def full() -> bool:
    return os.environ.get("FASTBIG_BENCH_FULL", "0") not in ("", "0")


def params(op: str, device: str = "cpu"):
    import pytest
    out = []
    for c in cases_mod.get_cases(op, device, quick=not full()):
        for i in c.impls:
            if device in i.devices:
                out.append(pytest.param(c, i, id=f"{c.name}|{i.name}".replace(" ", "_")))
    return out


def _inputs_and_oracle(case, device, dtype):
    key = (case.key, device, dtype)
    if key not in _cache:
        _cache.clear()                         # one case's tensors at a time
        inputs = case.make(device, dtype, torch.Generator().manual_seed(0))
        _cache[key] = (inputs, case.oracle(cases_mod.to64(inputs)))
    return _cache[key]


def run(benchmark, case, impl, device: str = "cpu", dtype=torch.float32):
    import pytest

    from .harness import check_impl
    if impl.compiled and not case.compile_ok:
        pytest.skip(case.compile_skip_reason or "torch.compile skipped")
    try:
        inputs, oracle = _inputs_and_oracle(case, device, dtype)
    except NotAvailable as e:
        pytest.skip(f"oracle not available: {e}")
    try:
        fn = impl.build(inputs)
        chk = check_impl(fn, oracle, inputs, tolerance(dtype, device))
    except NotAvailable as e:
        pytest.skip(f"not available: {e}")
    except (AttributeError, ImportError) as e:
        pytest.skip(f"not available: {type(e).__name__}: {e}")
    except RuntimeError as e:
        if impl.kind == "baseline":
            pytest.skip(f"not available here: {str(e).splitlines()[0][:200]}")
        raise
    assert chk["status"] == "ok", (f"{case.key} {impl.name}: WRONG: err={chk['err']} > tol "
                                   f"{chk['tol']:.0e} {chk.get('reason', '')}")
    benchmark.group = case.key
    benchmark.extra_info.update(err=chk["err"], work=case.work_for(dtype), unit=case.unit, impl=impl.name,
                                kind=impl.kind, threads=torch.get_num_threads())
    benchmark(fn)
