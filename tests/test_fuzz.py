"""Fuzzing every fastbig op against its float64 oracle, forward and backward.

Cases come from tests/fuzz/ (one module an op): shapes, dtypes, flags, memory layouts (contiguous,
transposed, strided, expanded) and backends drawn from ``random.Random(seed)``; tensors from
``torch.Generator().manual_seed(seed)``. Each case's outputs and input-gradients are bounded by
tests/conftest.py's per-dtype tolerances (``rel_err``, NaN never passes), and the caller's inputs
must come back unmodified.

Default counts: 1000 cases per op, the Triton interpreter's included (attention_triton: about
60-90 s on 2 cores, the others a few seconds each; see ``OPS[...].default_count`` and
``_attention_triton_shape``). The long run:

    FASTBIG_FUZZ=20000 python -m pytest tests/test_fuzz.py -q      # 20000 cases per op
    FASTBIG_FUZZ_BASE=7 ...                                          # another block of seeds

(FASTBIG_FUZZ sets every op's count, the Triton ones included.) A failure prints each failing
case's seed and parameters and the command that replays it:

    python tests/fuzz <op> <seed>

Expect the long run to turn up rare marginal misses (a few 1e-5 against float32's 1e-5) on tiny
float32 cases whose outputs are a handful of distinct numbers with cancellation (one of them
through the reference backend, i.e. torch's own ops): replay each before calling it a kernel bug.
"""
import os
import time

import pytest
import torch

import fuzz as fc

# ops whose default cases still fail because of a reported, unfixed bug: op -> reason (strict)
KNOWN_BUGS: dict = {}
OPS = [pytest.param(op, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[op])] if op in KNOWN_BUGS else [])
       for op in fc.OPS]


def _count(op):
    env = os.environ.get("FASTBIG_FUZZ")
    return int(env) if env else fc.OPS[op].default_count


@pytest.fixture
def one_thread():
    # tiny cases: a second thread only adds synchronisation (and other engineers' jobs share the cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("op", OPS)
def test_fuzz_against_float64_oracle(op, one_thread):
    spec = fc.OPS[op]
    ok, why = spec.available()
    if not ok:
        pytest.skip(f"{op}: {why}")
    base = int(os.environ.get("FASTBIG_FUZZ_BASE", "0"))
    n = _count(op)
    failures = []
    t0 = time.perf_counter()
    for seed in fc.seeds(op, n, base):
        try:
            p, results = fc.run_case(op, seed)
        except Exception as e:  # a crash on valid input is a failure too
            failures.append(f"seed={seed} params={fc.case_params(op, seed)}: raised "
                            f"{type(e).__name__}: {str(e)[:300]}")
            continue
        bad = [f"{name} rel err {err:.3e} > {bound:.1e}" for name, err, bound in results
               if not err <= bound]
        if bad:
            failures.append(f"seed={seed} params={p}: " + "; ".join(bad))
    dt = time.perf_counter() - t0
    print(f"fuzz {op}: {n} cases in {dt:.1f} s, {len(failures)} failed")
    if failures:
        shown = "\n  ".join(failures[:10])
        pytest.fail(f"{op}: {len(failures)} of {n} cases failed (replay one with "
                    f"`python tests/fuzz {op} <seed>`):\n  {shown}", pytrace=False)
