"""The results: derived figures (speed-ups, goals, achieved rate), the table, JSON and CSV."""
from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Dict, List, Optional

from .roof import fmt_rate

OK = "ok"


def _num(x) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else x


def derive(case_rec: dict, roof: dict) -> None:
    """Fill speed-ups, best baseline, achieved rate and goals into a case record (in place)."""
    impls: Dict[str, dict] = {r["impl"]: r for r in case_rec["impls"]}
    ok = {n: r for n, r in impls.items() if r["status"] == OK and r.get("median_ms")}
    eager = ok.get(case_rec["eager"])
    baselines = {n: r for n, r in ok.items() if r["kind"] == "baseline"}
    best_name = min(baselines, key=lambda n: baselines[n]["median_ms"]) if baselines else None
    case_rec["best_baseline"] = best_name
    unit = case_rec.get("unit") or ""
    peak = roof.get("flops") if unit == "FLOP" else roof.get("bytes_per_s") if unit == "B" else None
    for n, r in impls.items():
        r["speedup_vs_eager"] = r["speedup_vs_best"] = r["achieved_per_s"] = r["roof_frac"] = None
        if n not in ok:
            continue
        t = r["median_ms"]
        if eager is not None:
            r["speedup_vs_eager"] = eager["median_ms"] / t
        if best_name is not None:
            r["speedup_vs_best"] = baselines[best_name]["median_ms"] / t
        if case_rec.get("work") and unit:
            r["achieved_per_s"] = case_rec["work"] / (t / 1e3)
            if peak:
                r["roof_frac"] = r["achieved_per_s"] / peak
    for g in case_rec.get("goals", []):
        r = impls.get(g["impl"])
        g["value"], g["met"], g["why"] = None, None, ""
        if r is None or r["status"] != OK:
            g["why"] = f"{g['impl']}: {r['status'] if r else 'absent'}"
            continue
        if g.get("vs") is None:
            if r.get("peak_mem_bytes") is None:
                g["why"] = "memory not measured"
                continue
            g["value"] = r["peak_mem_bytes"]
            g["met"] = r["peak_mem_bytes"] <= g["max_bytes"]
            continue
        other = ok.get(g["vs"])
        if other is None:
            st = impls[g["vs"]]["status"] if g["vs"] in impls else "absent"
            g["why"] = f"{g['vs']}: {st}"
            continue
        g["value"] = other["median_ms"] / r["median_ms"]
        g["met"] = g["value"] >= g["ratio"]


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= s:
            return f"{n / s:.1f} {unit}"
    return f"{n} B"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def goal_text(g: dict) -> str:
    if g.get("vs") is None:
        lab = f"peak<={fmt_bytes(g['max_bytes'])}"
        if g.get("value") is None:
            return f"{lab}: n/a ({g.get('why', '')})"
        return f"{lab}: {fmt_bytes(g['value'])} {'met' if g['met'] else 'MISSED'}"
    lab = f">={g['ratio']:g}x {g['vs']}"
    if g.get("value") is None:
        return f"{lab}: n/a ({g.get('why', '')})"
    return f"{lab}: {g['value']:.2f}x {'met' if g['met'] else 'MISSED'}"


def status_text(r: dict) -> str:
    st = r["status"]
    if st == OK:
        s = f"ok err={r['err']:.1e}" if r.get("err") is not None else "ok"
        if r.get("notes"):          # fastbig's auto fell back to its reference
            s += " FELL BACK: " + r["notes"][0][:160]
        if r.get("note"):
            s += f" ({r['note']})"
        return s
    if st == "WRONG":
        e = r.get("err")
        es = "inf/nan" if e is None or e == float("inf") else f"{e:.2e}"
        return f"WRONG: err={es} > tol {r['tol']:.0e}" + (f" ({r['reason']})" if r.get("reason") else "")
    return f"{st}: {r.get('reason', '')}"


def table(meta: dict, cases: List[dict]) -> str:
    """The human table: one block per case, one row per implementation."""
    roof = meta["roof"]
    lines = [
        f"fastbig bench  device={meta['device']} ({meta['device_name']})  threads={meta['threads']}  "
        f"torch {meta['torch']}  triton {meta.get('triton') or '-'}  commit {meta.get('git_commit') or '-'}",
        f"roof: {fmt_rate(roof.get('flops'), 'FLOP/s')}, {fmt_rate(roof.get('bytes_per_s'), 'B/s')} "
        f"({roof.get('source', '')})",
        f"timer: {meta['timer']}; memory: {meta['memory_method']}",
        "errors: ||out - ref|| / ||ref|| vs the float64 oracle (max over outputs and gradients); "
        "a result over tolerance posts no time",
    ]
    if meta.get("threads_reason"):
        lines.append(f"threads: {meta['threads_reason']}")
    loads = [x for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x is not None]
    if loads and meta.get("cpu_count") and max(loads) > meta["cpu_count"]:
        lines.append(f"WARNING: load average {max(loads):.1f} on {meta['cpu_count']} CPUs during the "
                     f"run: other work shared the machine, CPU timings are noisy (see p20..p80)")
    hdr = (f"  {'implementation':<18} {'median ms':>10} {'p20..p80 ms':>19} {'vs eager':>9} "
           f"{'vs best':>8} {'achieved (of roof)':>24} {'peak mem':>10}  status / goal")
    for c in cases:
        work = ""
        if c.get("work") and c.get("unit"):
            work = ", " + (fmt_rate(c["work"], "FLOP").replace("FLOP", "FLOP") if c["unit"] == "FLOP"
                           else fmt_bytes(c["work"]) + " moved")
        lines.append("")
        lines.append(f"== {c['op']} | {c['case']} [{c['dtype']}{work}] eager={c['eager']} "
                     f"best baseline={c.get('best_baseline') or '-'}")
        if c.get("note"):
            lines.append(f"   note: {c['note']}")
        lines.append(hdr)
        for r in c["impls"]:
            if r["status"] == OK:
                med = f"{r['median_ms']:.3f}"
                rng = f"{r['p20_ms']:.3f}..{r['p80_ms']:.3f}"
            else:
                med, rng = "-", "-"
            ach = "-"
            if r.get("achieved_per_s"):
                u = "FLOP/s" if c["unit"] == "FLOP" else "B/s"
                ach = fmt_rate(r["achieved_per_s"], u)
                if r.get("roof_frac") is not None:
                    ach += f" ({100 * r['roof_frac']:.0f}%)"
            tail = status_text(r)
            goals = [goal_text(g) for g in c.get("goals", []) if g["impl"] == r["impl"]]
            if goals:
                tail += " | goal " + "; ".join(goals)
            lines.append(f"  {r['impl']:<18} {med:>10} {rng:>19} {_x(r.get('speedup_vs_eager')):>9} "
                         f"{_x(r.get('speedup_vs_best')):>8} {ach:>24} "
                         f"{fmt_bytes(r.get('peak_mem_bytes')):>10}  {tail}")
    return "\n".join(lines)


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def results_stem(meta: dict) -> str:
    dev = "cpu" if meta["device"] == "cpu" else "cuda-" + slug(meta["device_name"]).replace("nvidia-", "")
    stem = f"{dev}-{meta['date']}"
    if meta.get("smoke"):
        stem += "-smoke"
    elif meta.get("quick"):
        stem += "-quick"
    return stem


def _jsonable(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


def write_json(path: str, meta: dict, cases: List[dict]) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable({"meta": meta, "cases": cases}), f, indent=1)
        f.write("\n")


CSV_METRICS = ("median_ms", "p20_ms", "p80_ms", "n_samples", "err", "tol", "speedup_vs_eager",
               "speedup_vs_best", "achieved_per_s", "roof_frac", "peak_mem_bytes", "compile_s")


def write_csv(path: str, meta: dict, cases: List[dict]) -> None:
    """Long format: one row per case x implementation x metric (value empty when absent)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "device_name", "date", "op", "case", "mode", "dtype", "impl", "kind",
                    "status", "metric", "value"])
        for c in cases:
            for r in c["impls"]:
                for m in CSV_METRICS:
                    v = _num(r.get(m))
                    w.writerow([meta["device"], meta["device_name"], meta["date"], c["op"],
                                c["case"], c["mode"], c["dtype"], r["impl"], r["kind"],
                                r["status"], m, "" if v is None else repr(v)])
            for g in c.get("goals", []):
                v = _num(g.get("value"))
                label = (f"goal >={g['ratio']:g}x {g['vs']}" if g.get("vs")
                         else f"goal peak<={g['max_bytes']}B")
                w.writerow([meta["device"], meta["device_name"], meta["date"], c["op"], c["case"],
                            c["mode"], c["dtype"], g["impl"], "goal",
                            "met" if g.get("met") else ("missed" if g.get("met") is False else "n/a"),
                            label, "" if v is None else repr(v)])


def default_out_dir() -> str:
    """bench/results of the source checkout when there is one, else ./bench-results."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    cand = os.path.join(repo, "bench", "results")
    if os.path.isdir(os.path.join(repo, "bench")) and os.path.isfile(os.path.join(repo, "setup.py")):
        return cand
    return os.path.join(os.getcwd(), "bench-results")
