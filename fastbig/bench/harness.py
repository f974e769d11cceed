"""``fastbig bench``: every case, fastbig beside every baseline, in one process, same inputs.

For each case: make the inputs, compute the float64 oracle, then for each implementation build
it and run it once, checking its result against the oracle (and that it left its inputs
alone) before anything is timed: a wrong result posts "WRONG: err=..." and no time. The correct
ones are timed in alternating rounds, then their peak memory is taken, one call each.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from typing import List, Optional

import torch

from .. import testing
from .._progress import Progress
from . import cases as cases_mod
from . import report, roof as roof_mod, timing
from .cases import Case, NotAvailable, tolerance

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


# ---- progress ------------------------------------------------------------------------------
# ---- correctness ---------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """fastbig.testing.rel_err (||out - ref|| / ||ref|| in float64, inf for NaN/inf anywhere);
    a shape mismatch is a ValueError the harness reports as the implementation's failure."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    return testing.rel_err(out, ref)


def _tensors(inputs: dict, prefix=""):
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _tensors(v, prefix + k + ".")


def snapshot(inputs: dict) -> dict:
    return {k: v.detach().clone() for k, v in _tensors(inputs)}


def changed_inputs(inputs: dict, snap: dict) -> List[str]:
    return [k for k, v in _tensors(inputs) if k in snap and not torch.equal(v.detach(), snap[k])]


def check_impl(fn, oracle_out: List[torch.Tensor], inputs: dict, tol: float, *,
               device: Optional[str] = None) -> dict:
    """Run ``fn`` once and judge it: status ok | WRONG, err, notes (warnings), seconds; with
    ``device``, the peak memory of that call too (peak_mem_bytes, mem_method)."""
    snap = snapshot(inputs)
    peak = how = None
    try:   # fastbig warns once per (op, reason) and process: forget, so this call says it again
        from .. import backends as _backends
        _backends._reset_warnings()
    except Exception:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        if device is not None:
            outs, peak, how = timing.call_with_peak(fn, device)
        else:
            outs = fn()
        secs = time.perf_counter() - t0
    notes = []
    for w in caught:
        if w.category.__name__ == "FastbigFallbackWarning":
            notes.append(str(w.message))
    res = {"seconds": secs, "notes": notes, "err": None, "errs": [], "tol": tol,
           "peak_mem_bytes": peak, "mem_method": how}
    touched = changed_inputs(inputs, snap)
    if touched:
        res.update(status="WRONG", reason=f"wrote into its inputs: {', '.join(touched)}")
        return res
    if len(outs) != len(oracle_out):
        res.update(status="WRONG", reason=f"returned {len(outs)} tensors, expected {len(oracle_out)}")
        return res
    errs = []
    for i, (o, r) in enumerate(zip(outs, oracle_out)):
        try:
            errs.append(rel_err(o, r))
        except ValueError as e:
            res.update(status="WRONG", reason=f"output {i}: {e}")
            return res
    res["errs"] = errs
    res["err"] = max(errs) if errs else 0.0
    if not all(e <= tol for e in errs):        # NaN/inf never passes
        worst = max(range(len(errs)), key=lambda i: errs[i] if errs[i] == errs[i] else float("inf"))
        res.update(status="WRONG", reason=f"worst is output {worst} of {len(errs)}")
    else:
        res["status"] = report.OK
    return res


# ---- one case ------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200]}" if s else type(e).__name__


def impl_selected(name: str, filters) -> bool:
    """--impl: a filter selects the implementations whose name contains it; "=NAME" only NAME
    ("=fastbig" keeps fastbig without fastbig-ref)."""
    return any(name == f[1:] if f.startswith("=") else f in name for f in filters)


def run_case(case: Case, device: str, dtype: torch.dtype, *, seed: int, quick: bool, smoke: bool,
             progress: Optional[Progress] = None, impl_filter=None) -> dict:
    tol = tolerance(dtype, device)
    rec = {"op": case.op, "case": case.name, "mode": case.mode, "dtype": str(dtype).replace("torch.", ""),
           "params": case.params, "work": case.work_for(dtype), "unit": case.unit, "eager": case.eager,
           "size": case.size, "tol": tol, "note": case.note, "impls": [],
           "goals": [{"impl": g.impl, "vs": g.vs, "ratio": g.ratio, "max_bytes": g.max_bytes}
                     for g in case.goals]}
    label = f"{case.op} {case.name}"

    def step(msg, adv=0):
        if progress is not None:
            progress.update(f"{label}: {msg}", adv)

    impls = [i for i in case.impls if device in i.devices]
    if impl_filter:
        impls = [i for i in impls if impl_selected(i.name, impl_filter)]
    if any(i.compiled for i in impls) and case.compile_ok:
        try:   # fresh compile caches: no recompile limit reached across cases
            importlib.import_module("torch._dynamo").reset()
        except Exception:
            pass
    gen = torch.Generator().manual_seed(seed)
    step("making inputs and the float64 oracle")
    inputs = case.make(device, dtype, gen)
    try:
        oracle_out = case.oracle(cases_mod.to64(inputs))
    except NotAvailable as e:
        oracle_out, oracle_err = None, f"oracle not available: {e}"
    except Exception as e:
        oracle_out, oracle_err = None, f"oracle failed: {_first_line(e)}"
    runners = {}
    warmed = {}          # name -> ms of its check call, which was its warm-up
    for impl in impls:
        r = {"impl": impl.name, "kind": impl.kind, "status": "", "reason": "", "note": impl.note,
             "compiled": impl.compiled}
        rec["impls"].append(r)
        step(f"checking {impl.name}")
        if impl.compiled and not case.compile_ok:
            r.update(status="skipped", reason=case.compile_skip_reason or "torch.compile skipped")
            step(f"{impl.name} skipped", 1)
            continue
        if oracle_out is None:
            r.update(status="not available", reason=oracle_err)
            step(f"{impl.name} not available", 1)
            continue
        try:
            fn = impl.build(inputs)
            # The check call is the warm-up; its peak memory is taken too, except for a
            # compiled implementation (its first call compiles: measured after timing).
            chk = check_impl(fn, oracle_out, inputs, tol,
                             device=None if impl.compiled else device)
        except NotAvailable as e:
            r.update(status="not available", reason=str(e))
            step(f"{impl.name} not available", 1)
            continue
        except (AttributeError, ImportError) as e:
            r.update(status="not available", reason=_first_line(e))
            step(f"{impl.name} not available", 1)
            continue
        except Exception as e:
            if impl.kind == "baseline":   # e.g. an SDPA backend that cannot take these inputs
                r.update(status="not available", reason=_first_line(e))
            else:
                r.update(status="ERROR", reason=_first_line(e),
                         traceback=traceback.format_exc(limit=6))
            step(f"{impl.name} {r['status']}", 1)
            continue
        r.update(status=chk["status"], err=chk["err"], errs=chk["errs"], tol=tol,
                 notes=chk["notes"], reason=chk.get("reason", ""))
        if impl.compiled:
            r["compile_s"] = chk["seconds"]
        else:
            warmed[impl.name] = chk["seconds"] * 1e3
            r["peak_mem_bytes"], r["mem_method"] = chk["peak_mem_bytes"], chk["mem_method"]
        if chk["status"] == report.OK:
            runners[impl.name] = fn
        step(f"{impl.name} {r['status']}", 1)
    del oracle_out
    # ---- timing, in alternating rounds ----
    by_name = {r["impl"]: r for r in rec["impls"]}
    if runners:
        what = f"timing {len(runners)} implementations"
        step(what)

        def on_round(r):
            step(f"{what}, round {r} done")
        if device == "cuda":
            tm = timing.time_cuda(runners, rounds=2 if (quick or smoke) else 3,
                                  rep_ms=20 if smoke else (50 if quick else 100),
                                  warmup_ms=5 if smoke else 25, on_round=on_round)
        else:
            tm = timing.time_cpu(runners, min_samples=2 if smoke else (3 if quick else 7),
                                 max_samples=5 if smoke else (30 if quick else 100),
                                 budget_s=0.0 if smoke else (0.4 if quick else 3.0),
                                 warmed=warmed, on_round=on_round)
        for n, t in tm.items():
            if t.error:                  # passed its check, then failed while timed
                by_name[n].update(status="ERROR" if by_name[n]["kind"] != "baseline"
                                  else "not available", reason=f"while timing: {t.error}")
                runners.pop(n)
                continue
            by_name[n].update(median_ms=t.median, p20_ms=t.p20, p80_ms=t.p80,
                              n_samples=len(t.samples_ms), samples_ms=t.samples_ms,
                              calls_per_sample=t.inner, timer=t.timer)
        for n, fn in runners.items():
            if "peak_mem_bytes" not in by_name[n]:
                step(f"peak memory of {n}")
                by_name[n]["peak_mem_bytes"], by_name[n]["mem_method"] = timing.peak_memory(fn, device)
    step("done", 1)
    return rec


def _not_run(c: Case, dt, note: str) -> dict:
    return {"op": c.op, "case": c.name, "mode": c.mode, "dtype": str(dt).replace("torch.", ""),
            "params": c.params, "work": c.work_for(dt), "unit": c.unit, "eager": c.eager,
            "size": c.size, "goals": [], "impls": [], "note": note}


def _steps(case: Case, device: str, impl_filter) -> int:
    impls = [i for i in case.impls if device in i.devices]
    if impl_filter:
        impls = [i for i in impls if impl_selected(i.name, impl_filter)]
    return len(impls) + 1


# ---- metadata ------------------------------------------------------------------------------
def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        c = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                           text=True, timeout=10)
        if c.returncode != 0:
            return None
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10)
        return c.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
    except Exception:
        return None


def loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def metadata(device: str, args, roof: dict) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = None
    try:
        import fastbig
        build = fastbig.build_info()
        fb_v = fastbig.__version__
    except Exception as e:
        build, fb_v = {"error": str(e)}, None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": device, "device_name": roof["device_name"], "cpu": roof_mod.cpu_name(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__, "triton": triton_v, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "fastbig": fb_v, "fastbig_build": build, "git_commit": _git_commit(),
        "threads": torch.get_num_threads(), "threads_reason": getattr(args, "threads_reason", ""),
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg(), "roof": roof,
        "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": bool(args.quick), "smoke": bool(args.smoke), "argv": list(args.argv),
        "timer": ("CUDA events, warm-up, L2 flush, median of many (triton.testing.do_bench), "
                  "alternating rounds" if device == "cuda" else
                  "perf_counter after warm-up (the checked first call; one more after a compile), "
                  "median (p20/p80) of repeated runs in alternating rounds"),
        "memory_method": ("torch.cuda.max_memory_allocated minus the memory allocated before the call"
                          if device == "cuda" else
                          "torch CPU profiler memory events: peak of torch's allocations during one "
                          "call (the checked first call; a compiled one after its compile); "
                          "allocations oneDNN makes itself are not seen"),
        "tolerance": {str(k).replace("torch.", ""): v for k, v in cases_mod.TOL.items()},
    }


# ---- entry ---------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fastbig bench",
        description="fastbig vs eager torch, oneDNN/cuDNN, SDPA backends and torch.compile, side by "
                    "side on the same inputs; each result is checked against a float64 oracle "
                    "before it is timed. Exit code 1 if a fastbig implementation is WRONG or fails.")
    p.add_argument("--op", default="all",
                   help="attention | lstm | conv_bn_relu | models | all | transformers (not in all; "
                        "comma-separated list ok)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when there is a GPU)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated: float32, float16, bfloat16 (default: float32 on CPU, "
                        "float16,bfloat16 on CUDA)")
    p.add_argument("--quick", action="store_true", help="fewer/smaller cases, fewer samples, "
                   "torch.compile in one case only")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")
    p.add_argument("--case", action="append", default=None,
                   help="only cases whose name contains this (repeatable)")
    p.add_argument("--impl", action="append", default=None,
                   help="only implementations whose name contains this, or is exactly NAME for "
                        "=NAME (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 samples: the test suite's run")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time budget: no case starts once the elapsed time plus the longest case so "
                        "far would pass it; the cases left out are listed as not run (bench/gpu_run.sh)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return p, args


def _positive_int(s: str) -> int:
    """argparse type for --threads: an int >= 1 (0 was silently ignored, -1 a traceback)."""
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def choose_threads(requested: Optional[int], current: int, load: Optional[float],
                   ncpu: Optional[int]) -> tuple:
    """(threads, why-if-changed). --threads wins; else, on a CPU whose load average already
    exceeds its core count, 1 thread: OpenMP threads that wait for a descheduled peer would
    time the scheduler, not the kernels (seen here: 100x slower LSTM steps at 2 threads)."""
    if requested:
        return requested, ""
    if load is not None and ncpu and current > 1 and load > ncpu:
        return 1, (f"the load average is {load:.1f} on {ncpu} CPUs: timing with 1 thread instead "
                   f"of {current} (stalled OpenMP threads would time the scheduler); "
                   f"--threads {current} to insist")
    return current, ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        p, args = parse_args(argv)
    except SystemExit as e:            # --help, or argparse's own usage error: a code, not a raise
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        p.print_usage(sys.stderr)
        print(f"fastbig bench: --device: expected cpu or cuda, got {device!r}", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("fastbig bench: --device cuda: no CUDA GPU is visible to torch "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.op.split(",") if o.strip()]
    bad = [o for o in ops if o not in cases_mod.OPS + cases_mod.EXTRA_OPS + ("all",)]
    if bad or not ops:
        print(f"fastbig bench: --op: expected one of {', '.join(cases_mod.OPS + ('all',))}, "
              f"got {args.op!r}", file=sys.stderr)
        return 2
    dt_names = args.dtype.split(",") if args.dtype else (
        ["float16", "bfloat16"] if device == "cuda" else ["float32"])
    dtypes = []
    for n in dt_names:
        n = n.strip().lower().replace("torch.", "")
        if n not in DTYPES:
            print(f"fastbig bench: --dtype: expected float32, float16 or bfloat16, got {n!r}",
                  file=sys.stderr)
            return 2
        dtypes.append(DTYPES[n])
    # torch.backends.mkldnn.flags() (the oneDNN-off LSTM baseline) warns about Intel-GPU TF32
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    threads_before = torch.get_num_threads()
    n, args.threads_reason = choose_threads(args.threads, threads_before,
                                            loadavg() if device == "cpu" else None, os.cpu_count())
    if args.threads_reason:
        print(f"fastbig bench: {args.threads_reason}", file=sys.stderr, flush=True)
    torch.set_num_threads(n)
    try:
        return _run(args, device, ops, dtypes)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, device, ops, dtypes) -> int:
    out_dir = args.out or report.default_out_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        print(f"fastbig bench: --out: cannot create {out_dir!r}: {e}", file=sys.stderr)
        return 2

    all_cases: List[Case] = []
    for o in ops:
        for c in cases_mod.get_cases(o, device, quick=args.quick, smoke=args.smoke):
            if c.key not in {x.key for x in all_cases}:
                all_cases.append(c)
    if args.case:
        all_cases = [c for c in all_cases if any(f in c.name or f in c.op for f in args.case)]
    if not all_cases:
        print("fastbig bench: no case matches", file=sys.stderr)
        return 2

    la, ncpu = loadavg(), os.cpu_count() or 1
    if device == "cpu" and la is not None and la > ncpu:
        print(f"fastbig bench: the load average is {la:.1f} on {ncpu} CPUs: other work shares this "
              f"machine, so CPU timings will be slow and noisy", file=sys.stderr, flush=True)
    print(f"fastbig bench: measuring the roof of {device} ...", file=sys.stderr, flush=True)
    roof = roof_mod.roof(device, quick=args.quick, smoke=args.smoke)
    meta = metadata(device, args, roof)
    work = [(c, dt) for dt in dtypes for c in all_cases]
    prog = Progress(sum(_steps(c, device, args.impl) for c, _ in work))
    recs = []
    longest = 0.0
    try:
        for i, (c, dt) in enumerate(work):
            now = time.perf_counter() - prog.t0
            if args.budget is not None and now + longest > args.budget:
                recs.append(_not_run(c, dt, f"not run: --budget {args.budget:g} s "
                                            f"({now:.0f} s elapsed, longest case {longest:.0f} s)"))
                continue
            t_case = time.perf_counter()
            try:
                recs.append(run_case(c, device, dt, seed=args.seed * 1000 + i, quick=args.quick,
                                     smoke=args.smoke, progress=prog, impl_filter=args.impl))
            except Exception as e:       # a case that cannot even make its inputs
                recs.append(dict(_not_run(c, dt, f"case failed: {_first_line(e)}"),
                                 traceback=traceback.format_exc(limit=8)))
            longest = max(longest, time.perf_counter() - t_case)
    finally:
        prog.close()
    meta["elapsed_s"] = time.perf_counter() - prog.t0
    meta["loadavg_end"] = loadavg()
    if device == "cpu" and not args.smoke:
        # Measured again at the end; the roof is the better of the two (a busy moment at the
        # start must not make the roof low). Both are in the JSON.
        end = roof_mod.measure(device, n=1536 if args.quick else 2048,
                               copy_mb=128 if args.quick else 256)
        roof["measured_end"] = end
        if roof.get("source", "").startswith("measured"):
            roof["flops"] = max(roof["flops"], end["matmul_flops"])
            roof["bytes_per_s"] = max(roof["bytes_per_s"], end["copy_bytes_per_s"])
            roof["source"] += "; best of start and end of the run"
    for r in recs:
        report.derive(r, roof)
    print(report.table(meta, recs))
    stem = os.path.join(out_dir, report.results_stem(meta))
    report.write_json(stem + ".json", meta, recs)
    report.write_csv(stem + ".csv", meta, recs)
    notes = [f"results: {stem}.json, {stem}.csv"]
    if not args.no_plot:
        for o in sorted({r["op"] for r in recs}):
            notes.append(__import__("fastbig.bench.plots", fromlist=["plot_op"]).plot_op(
                o, recs, f"{stem}-{o}.png"))
    print("\n" + "\n".join(notes))
    print(f"elapsed {meta['elapsed_s']:.0f} s")
    bad = [(r["case"], x["impl"], x["status"]) for r in recs for x in r["impls"]
           if x["kind"] in ("fastbig", "reference") and x["status"] in ("WRONG", "ERROR")]
    if bad:
        print("fastbig implementations that are WRONG or failed: " +
              "; ".join(f"{c} {i} ({s})" for c, i, s in bad), file=sys.stderr)
        return 1
    return 0
