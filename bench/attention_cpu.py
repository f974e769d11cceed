"""fastbig's CPU flash attention vs PyTorch's SDPA CPU kernel, side by side in one process.

    python bench/attention_cpu.py [--threads 2,1] [--reps 7] [--cases all|goals|table]

Each case alternates the implementations rep by rep (a load spike hits both) and prints the
median time of each, the ratio t(sdpa) / t(ours) as the median and the range of the per-rep
ratios, and the achieved GFLOP/s (attention forward 4*B*H*Sq*Sk*D, halved when causal, fwd+bwd
3.5x) or GB/s (decode: K and V read once) of ours. "sdpa" is F.scaled_dot_product_attention on
the inputs' own dtype; "sdpa(fp32)" is what fastbig's SDPA path does for half inputs (convert
to float32, run, convert back), printed for bfloat16 to decide that rule.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastbig  # noqa: F401  (loads fastbig._C)
from fastbig.ops import _attention_cpu
from fastbig.ops.attention import _Features


def _ours(causal, dec):
    feats = _Features("attention", torch.empty(0), 0, 0, None, None, None, False)

    def f(q, k, v):
        return _attention_cpu.run(q, k, v, -1, 0 if causal else -1, None, None, q.shape[-1] ** -0.5,
                                  False, feats)
    return f


def _sdpa(causal, fp32=False):
    def f(q, k, v):
        if fp32:
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  is_causal=causal).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return f


def run_case(dtype, B, H, Sq, Sk, D, causal, mode, reps, extra_fp32=False):
    bwd = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(bwd)  # noqa: E731
    q, k, v = mk(B, H, Sq, D), mk(B, H, Sk, D), mk(B, H, Sk, D)
    do = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    impls = {"ours": _ours(causal, Sq <= 8), "sdpa": _sdpa(causal)}
    if extra_fp32:
        impls["sdpa(fp32)"] = _sdpa(causal, fp32=True)

    def call(f):
        t = time.perf_counter()
        o = f(q, k, v)
        if bwd:
            torch.autograd.grad(o, (q, k, v), do)
        return time.perf_counter() - t
    for f in impls.values():
        call(f)
    times = {n: [] for n in impls}
    for _ in range(reps):
        for n, f in impls.items():
            times[n].append(call(f))
    flops = 4.0 * B * H * Sq * Sk * D / (2 if causal else 1) * (3.5 if bwd else 1)
    med = {n: statistics.median(t) for n, t in times.items()}
    ratios = sorted(a / b for a, b in zip(times["sdpa"], times["ours"]))
    line = (f"{str(dtype)[6:]:8s} {mode:7s} B{B} H{H} Sq{Sq} Sk{Sk} D{D}{' causal' if causal else ''}: "
            f"ours {med['ours'] * 1e3:8.2f} ms  sdpa {med['sdpa'] * 1e3:8.2f} ms  ratio "
            f"{statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]")
    if Sq <= 8:
        byts = 2 * B * H * Sk * D * q.element_size()
        line += f"  ours {byts / med['ours'] / 1e9:.1f} GB/s sdpa {byts / med['sdpa'] / 1e9:.1f} GB/s"
    else:
        line += f"  ours {flops / med['ours'] / 1e9:.1f} GFLOP/s sdpa {flops / med['sdpa'] / 1e9:.1f}"
    if extra_fp32:
        r32 = statistics.median(a / b for a, b in zip(times["sdpa(fp32)"], times["sdpa"]))
        line += f"  [sdpa(fp32)/sdpa native {r32:.2f}]"
    print(line, flush=True)
    return med


GOALS = [
    (torch.bfloat16, 8, 8, 1024, 1024, 64, True, "fwd"),
    (torch.bfloat16, 8, 8, 1024, 1024, 64, True, "fwd+bwd"),
    (torch.float32, 8, 8, 1024, 1024, 64, True, "fwd"),
    (torch.float32, 8, 8, 1024, 1024, 64, True, "fwd+bwd"),
    (torch.bfloat16, 8, 32, 1, 4096, 128, False, "fwd"),
    (torch.float32, 8, 32, 1, 4096, 128, False, "fwd"),
    (torch.float32, 1, 1, 8192, 8192, 64, False, "fwd"),
]
# the sizes behind the `auto` table of fastbig/ops/_attention_cpu.py
TABLE = [
    (dt, B, H, S, S, D, c, m) for dt in (torch.float32, torch.bfloat16)
    for (B, H, S, D) in ((2, 4, 128, 64), (4, 8, 512, 64), (2, 8, 2048, 128))
    for c in (True, False) for m in ("fwd", "fwd+bwd")
] + [
    (dt, B, H, 1, Sk, D, False, "fwd") for dt in (torch.float32, torch.bfloat16)
    for (B, H, Sk, D) in ((1, 8, 256, 64), (4, 32, 1024, 128), (1, 32, 16384, 128))
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", default="goals", choices=("goals", "table", "all"))
    a = ap.parse_args()
    cases = (GOALS if a.cases in ("goals", "all") else []) + (TABLE if a.cases in ("table", "all") else [])
    for nt in (int(x) for x in a.threads.split(",")):
        torch.set_num_threads(nt)
        print(f"--- {nt} thread(s), torch {torch.__version__}, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
        for dt, B, H, Sq, Sk, D, causal, mode in cases:
            run_case(dt, B, H, Sq, Sk, D, causal, mode, a.reps, extra_fp32=dt == torch.bfloat16)


if __name__ == "__main__":
    main()
