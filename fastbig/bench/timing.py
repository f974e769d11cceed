"""Timing and peak memory, done one way for every implementation.

CPU: warm-up, then samples taken in rounds that alternate the implementations (A B C, B C A,
...), so the noise of this shared machine falls on all of them; each sample is one call (or a
few calls averaged when one call is under ~2 ms). Median with p20/p80.

GPU: CUDA events, warm-up, the L2 cache flushed before every run, median of many runs:
``triton.testing.do_bench(..., return_mode="all")`` called once per implementation per round
(rounds alternate as on CPU), falling back to our own CUDA-event loop when Triton's is missing.

Peak memory: on GPU ``torch.cuda.max_memory_allocated`` over one call, minus what was allocated
before. On CPU, tracemalloc cannot see torch's allocations, so one call runs under torch's CPU
profiler with ``profile_memory=True`` and the peak of the running sum of its allocation and free
events is taken (torch allocations only: memory that a library such as oneDNN takes from malloc
itself is not seen). Both are "extra memory over what existed before the call".
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence


@dataclass
class Timing:
    samples_ms: List[float] = field(default_factory=list)
    inner: int = 1          # calls averaged per sample
    timer: str = ""
    error: str = ""         # set when a call raised: no further samples for it

    @property
    def median(self) -> float:
        return quantile(self.samples_ms, 0.5)

    @property
    def p20(self) -> float:
        return quantile(self.samples_ms, 0.2)

    @property
    def p80(self) -> float:
        return quantile(self.samples_ms, 0.8)


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default); nan for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def round_orders(names: Sequence[str], rounds: int) -> List[List[str]]:
    """The order of each round: rotated by one each time (A B C, B C A, C A B, ...)."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)] if n else []


def time_cpu(fns: Dict[str, Callable[[], object]], *, min_samples: int = 5, max_samples: int = 50,
             budget_s: float = 2.0, min_sample_ms: float = 2.0, warmup: int = 1,
             warmed: Optional[Dict[str, float]] = None,
             on_round: Optional[Callable[[int], None]] = None,
             clock: Callable[[], float] = time.perf_counter) -> Dict[str, Timing]:
    """Time each function in alternating rounds. ``budget_s`` is per implementation.

    ``warmed`` maps the names already called once (the harness's check call, which is their
    warm-up) to that call's ms: they get no further warm-up call.
    """
    warmed = warmed or {}
    out = {n: Timing(timer="cpu perf_counter, alternating rounds") for n in fns}
    names = []
    for n in fns:                        # warm-up, and the size of one call
        try:
            if n in warmed:
                one = warmed[n]
            else:
                for _ in range(max(0, warmup - 1)):
                    fns[n]()
                t0 = clock()
                fns[n]()
                one = (clock() - t0) * 1e3
        except Exception as e:
            out[n].error = _err(e)
            continue
        out[n].inner = max(1, int(math.ceil(min_sample_ms / max(one, 1e-6)))) if one < min_sample_ms else 1
        names.append(n)
    start = clock()
    r = 0
    while names:
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            k = out[n].inner
            try:
                t0 = clock()
                for _ in range(k):
                    fns[n]()
                out[n].samples_ms.append((clock() - t0) * 1e3 / k)
            except Exception as e:       # drop it, keep timing the others
                out[n].error = _err(e)
                out[n].samples_ms.clear()
                names.remove(n)
        r += 1
        if on_round is not None:
            on_round(r)
        if not names:
            break
        done = min(len(out[n].samples_ms) for n in names)
        if done >= max_samples:
            break
        if done >= min_samples and clock() - start >= budget_s * len(names):
            break
    return out


def _err(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _do_bench_all(fn, warmup_ms: float, rep_ms: float) -> Optional[List[float]]:
    try:
        from triton.testing import do_bench
    except Exception:
        return None
    try:
        res = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except TypeError:                    # an old Triton without return_mode="all"
        return None
    return [float(x) for x in res]


def _cuda_events_all(fn, warmup_ms: float, rep_ms: float) -> List[float]:
    """Our own do_bench: CUDA events around each call, L2 flushed before each call."""
    import torch
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        flush.zero_()
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(3, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def time_cuda(fns: Dict[str, Callable[[], object]], *, rounds: int = 3, warmup_ms: float = 25.0,
              rep_ms: float = 100.0, on_round: Optional[Callable[[int], None]] = None
              ) -> Dict[str, Timing]:
    names = list(fns)
    out = {n: Timing() for n in names}
    for r, order in enumerate(round_orders(names, rounds)):
        for n in order:
            if out[n].error:
                continue
            try:
                res = _do_bench_all(fns[n], warmup_ms, rep_ms)
                if res is None:
                    res = _cuda_events_all(fns[n], warmup_ms, rep_ms)
                    out[n].timer = "CUDA events + L2 flush (own loop), alternating rounds"
                else:
                    out[n].timer = "triton.testing.do_bench (CUDA events + L2 flush), alternating rounds"
            except Exception as e:
                out[n].error = _err(e)
                out[n].samples_ms.clear()
                continue
            out[n].samples_ms.extend(res)
        if on_round is not None:
            on_round(r + 1)
    return out


# ---- peak memory ---------------------------------------------------------------------------
class _QuietStderr:
    """Silence C-level stderr (the profiler's start/stop chatter) for a moment."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._null, 2)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            os.close(self._null)
        return False


def peak_memory_cpu(fn: Callable[[], object]) -> Optional[int]:
    """Peak extra bytes held by torch's CPU allocator during one call (profiler memory events)."""
    return _call_peak_cpu(fn)[1]


def _call_peak_cpu(fn):
    import torch  # noqa: F401
    from torch.profiler import ProfilerActivity, profile
    with _QuietStderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            res = fn()
        events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nb in mem:
        live += nb
        peak = max(peak, live)
    return res, int(peak)


def peak_memory_cuda(fn: Callable[[], object]) -> int:
    return _call_peak_cuda(fn)[1]


def _call_peak_cuda(fn):
    import torch
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    return res, int(torch.cuda.max_memory_allocated() - base)


MEM_HOW = {"cuda": "torch.cuda.max_memory_allocated delta",
           "cpu": "torch CPU profiler memory events (torch allocations)"}


def call_with_peak(fn: Callable[[], object], device: str) -> tuple:
    """Call ``fn`` once: (its result, peak extra bytes or None, how measured or why not).

    A failure of the measurement itself (the profiler's private event API moved) is reported
    and the call is made plainly; an exception of ``fn`` propagates.
    """
    measure = _call_peak_cuda if device == "cuda" else _call_peak_cpu
    try:
        import torch.profiler  # noqa: F401
    except Exception as e:  # pragma: no cover
        return fn(), None, f"not measured ({type(e).__name__}: {e})"
    state = {}

    def wrapped():
        state["res"] = fn()
        state["done"] = True
        return state["res"]
    try:
        res, peak = measure(wrapped)
        return res, peak, MEM_HOW[device]
    except Exception as e:
        if state.get("done"):          # fn ran; the measurement failed after it
            return state["res"], None, f"not measured ({type(e).__name__}: {e})"
        raise


def peak_memory(fn: Callable[[], object], device: str) -> tuple:
    """(bytes or None, how it was measured or why not) of one call of ``fn``."""
    try:
        _, peak, how = call_with_peak(fn, device)
        return peak, how
    except Exception as e:
        return None, f"not measured ({type(e).__name__}: {e})"
