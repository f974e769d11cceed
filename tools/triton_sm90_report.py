"""Compile every autotune config of every Triton kernel of fastbig/kernels/attention.py for sm_90
WITHOUT a GPU, and report shared memory, registers and spills per config; flags configs that
exceed sm_90's 227 KiB of shared memory per block or spill.

    python tools/triton_sm90_report.py [--triton-python /work/venv-t36/bin/python] [--out FILE]
                                       [--full] [--jobs N] [--dtypes fp16,bf16,fp32] [--head-dims 64,128,256]

Two steps, so that the kernels compile with the GPU machine's Triton (3.6) while torch and
fastbig come from this interpreter:
1. capture (this interpreter: torch + fastbig): the launchers attention_forward/backward and
   dropout_mask run on small CPU tensors for every feature case, dtype and head dim, with each
   module-level Triton kernel or autotuner replaced by a recorder: what the GPU launch would
   pass (argument types, values that Triton specializes on, constexprs) is recorded, with the
   autotuner's configs and which of them its early_config_prune keeps. Kernels, configs and
   prune rule are read from the module, so the report follows kernel changes. Feature cases
   whose keyword the launchers do not take yet (softcap, sinks, alibi_slopes, bottom_right) are
   listed as not captured.
2. compile (--triton-python, a Triton 3.6 interpreter; torch not needed there): the module is
   loaded by path (a stub stands in for torch at import), each record is bound with Triton's
   own binder (MockTensor for tensors) and triton.compile(ASTSource(...), target=
   GPUTarget("cuda", 90, 32)) runs for every config; ptxas -v's log gives registers and spills,
   the kernel's metadata the shared memory.

Default cases: every config x dtype x head dim for the plain case and for "all" (every flag on
together: the superset of the code, so the largest registers/shared memory), and every other
feature alone at bf16, D=128; --full compiles every feature at every dtype and head dim.
Exit status 1 when a config that the prune keeps does not fit (shared memory > 227 KiB) or
spills, or a compile fails; 0 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "fastbig", "kernels", "attention.py")
SMEM_LIMIT = 227 * 1024  # sm_90: max dynamic shared memory per block (opt-in)
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (64, 128, 256)
# name -> (forward/backward launcher keywords); "all" is every case that the launchers accept
FEATURES = {
    "plain": {},
    "mask_bool": {"attn_mask": "bool"},
    "mask_add": {"attn_mask": "add", "mask_grad": True},
    "kpm": {"key_padding_mask": True},
    "causal": {"window_left": -1, "window_right": 0},
    "window": {"window_left": 64, "window_right": 16},
    "dropout": {"dropout_p": 0.1, "seed": 1234},
    "varlen": {"varlen": True},
    "softcap": {"softcap": 30.0},
    "sinks": {"sinks": True},
    "alibi": {"alibi_slopes": True},
    "bottom_right": {"bottom_right": True, "window_left": -1, "window_right": 0},
}
_ALL_EXCLUDE = ("plain", "causal", "mask_bool")  # "all": additive mask (+ its grad), window, ...


# ----------------------------------------------------------------------------------------------
# 1. capture (torch + fastbig)
# ----------------------------------------------------------------------------------------------
def _describe(v):
    import torch
    if isinstance(v, torch.Tensor):
        name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64",
                torch.bool: "i1"}[v.dtype]
        return {"tensor": name}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "value"):  # tl.constexpr
        return v.value
    raise TypeError("cannot record a kernel argument of type %s" % type(v).__name__)


class _Recorder:
    """Stands in for a module-level kernel or autotuner: kernel[grid](*args, **kw) records."""

    def __init__(self, name, obj, sink):
        self.name, self.obj, self.sink = name, obj, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import triton
            auto = isinstance(self.obj, triton.runtime.autotuner.Autotuner)
            fn = self.obj.fn if auto else self.obj
            rec = {"global": self.name, "kernel": fn.__name__,
                   "args": [_describe(a) for a in args],
                   "kwargs": {k: _describe(v) for k, v in kwargs.items()}}
            if auto:
                named = dict(zip(fn.arg_names, args))
                kept = self.obj.configs
                if self.obj.early_config_prune:
                    kept = self.obj.early_config_prune(self.obj.configs, named, **kwargs)
                rec["configs"] = [
                    {"index": i, "kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages,
                     "pruned": not any(c is k for k in kept)} for i, c in enumerate(self.obj.configs)]
            self.sink.append(rec)
        return launch


def _case_inputs(dtype, D, feat, B=2, H=4, S=256, Hkv=2):
    import torch
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)
    kw = {"scale": D ** -0.5}
    varlen = bool(feat.get("varlen"))
    if varlen:
        q = torch.randn(B * S, H, D, generator=g).to(dt)
        k = torch.randn(B * S, Hkv, D, generator=g).to(dt)
        cu = torch.tensor([0, S, 2 * S], dtype=torch.int32)
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S, max_seqlen_k=S)
    else:
        q = torch.randn(B, H, S, D, generator=g).to(dt)
        k = torch.randn(B, Hkv, S, D, generator=g).to(dt)
    v = torch.randn_like(k)
    for name, val in feat.items():
        if name == "varlen":
            continue
        if name == "attn_mask":
            kw[name] = (torch.rand(S, S, generator=g) > 0.1) if val == "bool" else torch.randn(S, S, generator=g).to(dt)
        elif name == "key_padding_mask":
            kw[name] = torch.zeros(B, S, dtype=torch.bool)
        elif name == "sinks":
            kw[name] = torch.randn(H, generator=g)
        elif name == "alibi_slopes":
            kw[name] = torch.rand(H, generator=g)
        else:
            kw[name] = val
    return q, k, v, kw


def _accepts(fn, names):
    import inspect
    params = inspect.signature(fn).parameters
    return all(n in params for n in names)


def capture(dtypes, head_dims, full, only=None):
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU path: autotuned launchers, tf32 dots
    sys.path.insert(0, ROOT)
    import torch
    import triton
    import fastbig.kernels.attention as A
    if A.INTERPRET:
        raise RuntimeError("fastbig.kernels.attention was imported under TRITON_INTERPRET=1 before this script ran")

    feats = {}
    missing = []
    for name, f in FEATURES.items():
        launcher_kw = [k for k in f if k not in ("varlen", "mask_grad")]
        if _accepts(A.attention_forward, launcher_kw):
            feats[name] = f
        else:
            missing.append(name)
    allf = {}
    for name, f in feats.items():
        if name not in _ALL_EXCLUDE:
            allf.update(f)
    if "bottom_right" not in feats:  # a window is in "all"; bottom_right's causal would override it
        pass
    else:
        allf.update(window_left=64, window_right=16)
    feats["all"] = allf

    sink = []
    saved = {}
    for n, v in list(vars(A).items()):
        if isinstance(v, triton.runtime.autotuner.Autotuner) or (
                isinstance(v, triton.runtime.jit.JITFunction) and not n.startswith(("_score", "_dropout_keep"))):
            saved[n] = v
            setattr(A, n, _Recorder(n, v, sink))
    cases, failures = [], []
    try:
        for fname, f in feats.items():
            if only and fname not in only:
                continue
            for dtype in dtypes:
                for D in head_dims:
                    if not full and fname not in ("plain", "all") and (dtype != "bf16" or D != 128):
                        continue
                    q, k, v, kw = _case_inputs(dtype, D, f)
                    start = len(sink)
                    fwd_kw = {x: y for x, y in kw.items() if x != "mask_grad"}
                    try:
                        out, lse = A.attention_forward(q, k, v, **fwd_kw)[:2]
                        A.attention_backward(torch.randn_like(q), q, k, v, out, lse, **kw)
                    except Exception as e:  # noqa: BLE001 - reported, the other cases go on
                        failures.append("%s %s D=%d: %s: %s" % (fname, dtype, D, type(e).__name__, e))
                        continue
                    for rec in sink[start:]:
                        rec.update(case=fname, dtype=dtype, D=D)
                        cases.append(rec)
        # the dropout-mask kernel (tests and reference recomputation use it)
        start = len(sink)
        if not only or "dropout_mask" in only:
            A.dropout_mask(2, 4, 64, 64, 0.1, 1, "cpu")
        for rec in sink[start:]:
            rec.update(case="dropout_mask", dtype="-", D=0)
            cases.append(rec)
    finally:
        for n, v in saved.items():
            setattr(A, n, v)
    return {"records": cases, "capture_failures": failures, "features_missing": missing,
            "features": {k: sorted(v) for k, v in feats.items()},
            "kernel_globals": sorted(saved)}


# ----------------------------------------------------------------------------------------------
# 2. compile (Triton 3.6; torch not needed)
# ----------------------------------------------------------------------------------------------
def _load_kernels_without_torch():
    """fastbig/kernels/attention.py by path; a stub module stands in for torch while it imports
    (the kernels need only triton; torch is used by the launchers, which are not called here)."""
    import importlib.util
    os.environ.pop("TRITON_INTERPRET", None)
    stub = None
    try:
        import torch  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torch")
        stub.__getattr__ = lambda name: types.SimpleNamespace()  # torch.float32 etc. at import time
        sys.modules["torch"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_fastbig_attention_kernels", KERNELS)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if stub is not None:
            del sys.modules["torch"]
    return mod


def _ptxas_numbers(log):
    regs = re.search(r"Used (\d+) registers", log)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(regs.group(1)) if regs else None, int(st.group(1)) + int(st.group(2)) if st else None,
            int(stack.group(1)) if stack else None)


def _compile_one(job):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature
    from triton import knobs

    mod = _MOD
    rec, cfg = job["rec"], job["cfg"]
    obj = getattr(mod, rec["global"])
    fn = obj.fn if hasattr(obj, "configs") else obj
    dts = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64, "u8": tl.uint8,
           "i8": tl.int8, "i32": tl.int32, "i64": tl.int64, "i1": tl.int1}
    args = [MockTensor(dts[a["tensor"]]) if isinstance(a, dict) else a for a in rec["args"]]
    kwargs = dict(rec["kwargs"])
    if cfg is not None:
        c = obj.configs[cfg["index"]]
        if dict(c.kwargs) != cfg["kwargs"]:
            raise RuntimeError("config %d differs between capture and compile" % cfg["index"])
        kwargs.update(c.all_kwargs())
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in fn.arg_names}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    t0 = time.time()
    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    regs, spill, stack = _ptxas_numbers(buf.getvalue())
    if regs is None:
        raise RuntimeError("no ptxas log (a cached kernel?): the report compiles in a fresh cache")
    return {"shared": k.metadata.shared, "regs": regs, "spill": spill, "stack": stack,
            "num_warps": k.metadata.num_warps, "num_stages": k.metadata.num_stages, "seconds": time.time() - t0}


_MOD = None


def _init_worker():
    global _MOD
    _MOD = _load_kernels_without_torch()


def _run_job(job):
    try:
        return dict(job, result=_compile_one(job))
    except Exception as e:  # noqa: BLE001 - a failed compile is a result
        return dict(job, error="%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else ""))


def compile_all(records, jobs):
    import triton
    # one compile per distinct (kernel, argument description, constexprs, config)
    seen, work = {}, []
    for i, rec in enumerate(records):
        cfgs = rec.get("configs") or [None]
        for cfg in cfgs:
            key = json.dumps([rec["global"], rec["args"], rec["kwargs"], cfg and cfg["index"]], sort_keys=True)
            if key in seen:
                continue
            seen[key] = len(work)
            work.append({"key": key, "rec": rec, "cfg": cfg})
    t0 = time.time()
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(jobs, initializer=_init_worker) as pool:
            done = list(pool.imap(_run_job, work, chunksize=1))
    else:
        _init_worker()
        done = []
        for j in work:
            done.append(_run_job(j))
            sys.stderr.write("\rcompiled %d/%d" % (len(done), len(work)))
        sys.stderr.write("\n")
    return {"triton": triton.__version__, "python": sys.version.split()[0], "seconds": time.time() - t0,
            "compiled": [{"key": d["key"], "result": d.get("result"), "error": d.get("error")} for d in done]}


# ----------------------------------------------------------------------------------------------
# 3. the table
# ----------------------------------------------------------------------------------------------
def table(cap, comp, argv):
    by_key = {c["key"]: c for c in comp["compiled"]}
    rows = []
    for rec in cap["records"]:
        for cfg in rec.get("configs") or [None]:
            key = json.dumps([rec["global"], rec["args"], rec["kwargs"], cfg and cfg["index"]], sort_keys=True)
            c = by_key[key]
            r = c["result"] or {}
            if cfg is not None:
                conf = "%s w%d s%d" % ("x".join(str(cfg["kwargs"][k]) for k in sorted(cfg["kwargs"])),
                                       cfg["num_warps"], cfg["num_stages"])
            else:
                bl = {k: v for k, v in rec["kwargs"].items() if k.startswith("BLOCK_")}
                conf = "x".join(str(bl[k]) for k in sorted(bl) if k != "BLOCK_D") + " (fixed)"
            smem = r.get("shared")
            fits = smem is not None and smem <= SMEM_LIMIT
            spills = bool(r.get("spill")) or bool(r.get("stack"))
            rows.append(dict(case=rec["case"], dtype=rec["dtype"], D=rec["D"], kernel=rec["kernel"], conf=conf,
                             pruned=bool(cfg and cfg["pruned"]), smem=smem, regs=r.get("regs"),
                             spill=r.get("spill"), stack=r.get("stack"), error=c["error"],
                             flag=("ERROR" if c["error"] else "") or
                             ",".join(x for x, y in (("SMEM>227K", not fits), ("SPILL", spills)) if y)))
    lines = ["# Triton %s (Python %s) for sm_90 (GPUTarget('cuda', 90, 32)), no GPU; %s" % (
        comp["triton"], comp["python"], datetime.date.today().isoformat()),
        "# made by: python tools/triton_sm90_report.py %s" % " ".join(argv),
        "# kernels from fastbig/kernels/attention.py: %s" % ", ".join(cap["kernel_globals"]),
        "# feature cases: %s" % "; ".join("%s=%s" % (k, "+".join(v) or "-") for k, v in cap["features"].items()),
        "# not captured (the launchers do not take their keyword yet): %s" % (", ".join(cap["features_missing"]) or "none"),
        "# shape: B=2, Hq=4, Hkv=2 (GQA), S=256; smem: bytes of shared memory a block needs (limit %d = 227 KiB);" % SMEM_LIMIT,
        "# regs: registers per thread; spill: bytes spilled (stores + loads), stack: bytes of stack frame;",
        "# pruned: the autotuner's early_config_prune drops the config for this head dim (never launched)", ""]
    hdr = "%-12s %-5s %4s %-28s %-18s %-6s %7s %5s %6s %6s  %s" % (
        "case", "dtype", "D", "kernel", "config (MxN w s)", "pruned", "smem", "regs", "spill", "stack", "flag")
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append("%-12s %-5s %4s %-28s %-18s %-6s %7s %5s %6s %6s  %s" % (
            r["case"], r["dtype"], r["D"], r["kernel"], r["conf"], "yes" if r["pruned"] else "", r["smem"],
            r["regs"], r["spill"], r["stack"], r["flag"] + ((" " + r["error"]) if r["error"] else "")))
    lines += ["", "summary: %d launches recorded, %d distinct compiles in %.0f s (Triton %s)" % (
        len(rows), len(comp["compiled"]), comp["seconds"], comp["triton"])]
    lines += summary(rows)
    if cap["capture_failures"]:
        lines.append("capture failures (cases not compiled): %d" % len(cap["capture_failures"]))
        lines += ["  " + f for f in cap["capture_failures"]]
    bad_live = [r for r in rows if not r["pruned"] and r["flag"]]
    return "\n".join(lines) + "\n", (1 if bad_live or cap["capture_failures"] else 0)


def _flags(r):
    return set(f for f in (r["flag"] or "").split(",") if f)


def summary(rows):
    """The summary lines under the table: maxima, then which kept configs do not fit or spill,
    as a matrix per case (plain: the common launch; all: every flag on) and as a list."""
    lines = []
    ok = [r for r in rows if r["smem"] is not None]
    live = [r for r in rows if not r["pruned"]]
    bad_live = [r for r in live if r["flag"]]
    bad_pruned = [r for r in rows if r["pruned"] and r["flag"]]
    if ok:
        lines.append("max shared memory %d B (%.1f KiB), max registers %d; compiles with spills/stack: %d of %d" % (
            max(r["smem"] for r in ok), max(r["smem"] for r in ok) / 1024, max(r["regs"] or 0 for r in ok),
            sum(1 for r in ok if r["spill"] or r["stack"]), len(ok)))
    lines.append("kept by the prune: %d rows, %d over 227 KiB of shared memory, %d spilling, %d failed to compile" % (
        len(live), sum(1 for r in live if "SMEM>227K" in _flags(r)), sum(1 for r in live if "SPILL" in _flags(r)),
        sum(1 for r in live if "ERROR" in _flags(r))))
    cols = [(dt, d) for dt in ("fp16", "bf16", "fp32") for d in (64, 128, 256)]
    for case in ("plain", "all"):
        sel = [r for r in rows if r["case"] == case]
        if not sel:
            continue
        lines += ["", "matrix, case %r: . fits, no spill | S spills | M > 227 KiB smem | E compile error | "
                      "lower case: pruned for that head dim (never launched)" % case,
                  "%-28s %-14s %s" % ("kernel", "config", "  ".join("%s/%d" % c for c in cols))]
        keys = []
        for r in sel:
            k = (r["kernel"], r["conf"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            cells = []
            for dt, d in cols:
                m = [r for r in sel if (r["kernel"], r["conf"]) == k and r["dtype"] == dt and r["D"] == d]
                if not m:
                    cells.append("-")
                    continue
                f = _flags(m[0])
                c = ("E" if "ERROR" in f else "") + ("M" if "SMEM>227K" in f else "") + ("S" if "SPILL" in f else "")
                c = c or "."
                cells.append(c.lower() if m[0]["pruned"] and c != "." else c)
            lines.append("%-28s %-14s %s" % (k[0], k[1], "  ".join("%-8s" % c for c in cells)))
    lines += ["", "kept by the prune and NOT fitting/spilling/failing, over all cases: %d rows" % len(bad_live)]
    lines += ["  %s" % r for r in _distinct(bad_live)]
    lines.append("pruned (never launched) and not fitting/spilling: %d rows" % len(bad_pruned))
    lines += ["  %s" % r for r in _distinct(bad_pruned)]
    return lines


def parse_table(text):
    """The rows of a table this script wrote (for --resummarize)."""
    rows, on = [], False
    for line in text.splitlines():
        if line.startswith("-----"):
            on = True
            continue
        if not on:
            continue
        if not line.strip() or line.startswith("summary:"):
            break
        t = line.split()
        if t[5] == "(fixed)":
            conf, i = t[4] + " (fixed)", 6
        else:
            conf, i = " ".join(t[4:7]), 7
        pruned = t[i] == "yes"
        i += pruned
        num = lambda x: None if x == "None" else int(x)  # noqa: E731
        rows.append(dict(case=t[0], dtype=t[1], D=int(t[2]), kernel=t[3], conf=conf, pruned=pruned,
                         smem=num(t[i]), regs=num(t[i + 1]), spill=num(t[i + 2]), stack=num(t[i + 3]),
                         flag=t[i + 4] if len(t) > i + 4 else "", error=None))
    return rows


def _distinct(rows):
    """(kernel, config, dtype, D) -> the worst flag and smem/regs over the feature cases."""
    agg = {}
    for r in rows:
        k = (r["kernel"], r["conf"], r["dtype"], r["D"])
        a = agg.setdefault(k, {"flags": set(), "smem": 0, "regs": 0, "cases": set()})
        a["flags"] |= _flags(r)
        a["smem"] = max(a["smem"], r["smem"] or 0)
        a["regs"] = max(a["regs"], r["regs"] or 0)
        a["cases"].add(r["case"])
    return ["%s %s %s D=%s: %s smem %d regs %d (cases: %s)" % (k[0], k[1], k[2], k[3], ",".join(sorted(a["flags"])),
                                                            a["smem"], a["regs"], ",".join(sorted(a["cases"])))
            for k, a in sorted(agg.items(), key=lambda kv: tuple(str(x) for x in kv[0]))]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton-python", default=os.environ.get("FASTBIG_TRITON_PYTHON", "/work/venv-t36/bin/python"),
                    help="interpreter with the target Triton (default /work/venv-t36/bin/python; "
                         "'self' = this one)")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--full", action="store_true", help="every feature at every dtype and head dim")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--cases", help="only these feature cases (comma list; default all of them)")
    ap.add_argument("--resummarize", metavar="TABLE",
                    help="rewrite the summary under an existing table (its rows are kept), compile nothing")
    ap.add_argument("--compile-json", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.compile_json:  # step 2, in the Triton 3.6 interpreter
        with open(a.compile_json[0]) as f:
            job = json.load(f)
        res = compile_all(job["records"], job["jobs"])
        with open(a.compile_json[1], "w") as f:
            json.dump(res, f)
        return 0
    if a.resummarize:
        text = open(a.resummarize).read()
        head = text.split("\nsummary:", 1)[0]
        first = text.split("\nsummary:", 1)[1].splitlines()[0] if "\nsummary:" in text else ""
        keep = [l for l in text.split("\nsummary:", 1)[1].splitlines() if l.startswith("capture failures")] \
            if "\nsummary:" in text else []
        out = head + "\nsummary:" + first + "\n" + "\n".join(summary(parse_table(text)) + keep) + "\n"
        with open(a.resummarize, "w") as f:
            f.write(out)
        sys.stdout.write(out[len(head):])
        return 0
    cap = capture(a.dtypes.split(","), [int(x) for x in a.head_dims.split(",")], a.full,
                  a.cases.split(",") if a.cases else None)
    with tempfile.TemporaryDirectory() as tmp:
        jin, jout = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(jin, "w") as f:
            json.dump({"records": cap["records"], "jobs": a.jobs}, f)
        py = sys.executable if a.triton_python == "self" else a.triton_python
        # A fresh Triton cache, so ptxas runs for every config: a cached kernel has no ptxas log,
        # and its cubin gives local memory, not the spill stores + loads this table reports.
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "triton-cache"))
        r = subprocess.run([py, os.path.abspath(__file__), "--compile-json", jin, jout], env=env)
        if r.returncode != 0:
            print("triton_sm90_report: the compile step failed (%s)" % py, file=sys.stderr)
            return 2
        with open(jout) as f:
            comp = json.load(f)
    text, rc = table(cap, comp, argv)
    sys.stdout.write(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
