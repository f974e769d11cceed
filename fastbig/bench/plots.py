"""One PNG per op: speed-up vs eager of every implementation, case by case.

matplotlib is imported here, lazily; without it the plot is skipped with a note.
"""
from __future__ import annotations

import os
from typing import Dict, List


def plot_op(op: str, cases: List[dict], path: str) -> str:
    """Write the PNG for ``op``; returns a note saying what was done (or why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot {os.path.basename(path)} skipped: matplotlib is not importable ({type(e).__name__})"
    mine = [c for c in cases if c["op"] == op]
    impl_names: List[str] = []
    for c in mine:
        for r in c["impls"]:
            if r.get("speedup_vs_eager") is not None and r["impl"] not in impl_names:
                impl_names.append(r["impl"])
    if not mine or not impl_names:
        return f"plot {os.path.basename(path)} skipped: no timed results for {op}"
    mine = sorted(mine, key=lambda c: (c["mode"], c.get("size", 0), c["case"]))
    n, k = len(mine), len(impl_names)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n + 2), 4.5))
    for j, name in enumerate(impl_names):
        xs, ys = [], []
        for i, c in enumerate(mine):
            r: Dict = next((r for r in c["impls"] if r["impl"] == name), {})
            if r.get("speedup_vs_eager") is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r["speedup_vs_eager"])
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{c['case']}\n{c['dtype']}" for c in mine], rotation=30, ha="right",
                       fontsize=7)
    ax.set_ylabel("speed-up vs the case's eager (higher is better)")
    ax.set_title(f"fastbig bench: {op}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written: {path}"


def main(argv=None) -> int:
    """``python -m fastbig.bench.plots RESULTS.json ...``: the PNGs of a results file, beside it
    (for a run made where matplotlib was missing)."""
    import json
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m fastbig.bench.plots RESULTS.json [...]", file=sys.stderr)
        return 2
    for path in argv:
        with open(path) as f:
            data = json.load(f)
        stem = path[:-5] if path.endswith(".json") else path
        for op in sorted({c["op"] for c in data["cases"]}):
            print(plot_op(op, data["cases"], f"{stem}-{op}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
