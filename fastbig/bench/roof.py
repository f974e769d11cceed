"""The machine's roof: what the device can do at best, measured at start or from its datasheet.

Measured: the FLOP/s of a large matmul (fp32 on CPU; fp16 on an unknown GPU, whose fp32 path
may or may not use TF32) and the bandwidth of a large clone (bytes read + bytes written), best
of a few runs. A known GPU uses its datasheet peak (dense fp16/bf16 tensor cores, HBM).
"""
from __future__ import annotations

import platform
import time
from typing import Optional

import torch

# name fragment -> (dense fp16/bf16 TFLOP/s, TB/s); first match wins, so the specific ones first.
DATASHEET = (
    ("H200", 989.0, 4.8),
    ("H100 PCIE", None, None),          # not the SXM part: measure it
    ("H100", 989.0, 3.35),              # H100 SXM (HBM3)
    ("A100", 312.0, 2.0),
)


def datasheet_peak(device_name: str):
    """(TFLOP/s, TB/s) from the table, or None for a device not in it."""
    up = device_name.upper()
    for frag, tflops, tbs in DATASHEET:
        if frag in up:
            return None if tflops is None else (tflops, tbs)
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_name()


def _best_s(fn, reps: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(device: str, *, n: int = 2048, copy_mb: int = 256, reps: int = 3) -> dict:
    """Measured matmul FLOP/s and copy bytes/s of this device."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cuda":
        n = max(n, 8192)
        copy_mb = max(copy_mb, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _best_s(lambda: a @ b, reps, sync)
    flops = 2.0 * n ** 3 / t
    del a, b
    x = torch.randn(copy_mb * (1 << 20) // 4, device=device)
    nbytes = 2.0 * x.numel() * x.element_size()           # read + write
    clone_bw = nbytes / _best_s(lambda: x.clone(), reps, sync)
    y = torch.empty_like(x)
    copy_bw = nbytes / _best_s(lambda: y.copy_(x), reps, sync)
    # A fresh clone also pays for first-touch page faults on CPU; the roof is the better of the two.
    return {"matmul_flops": flops, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_n": n, "copy_bytes_per_s": max(copy_bw, clone_bw), "clone_bytes_per_s": clone_bw,
            "copy_into_bytes_per_s": copy_bw, "copy_mb": copy_mb}


def roof(device: str, *, quick: bool = False, smoke: bool = False) -> dict:
    """The roof the report compares against, with where each number came from."""
    name = device_name(device)
    out = {"device_name": name, "threads": torch.get_num_threads()}
    if smoke:
        meas = measure(device, n=512, copy_mb=16, reps=2)
    else:
        meas = measure(device, n=1536 if quick else 2048, copy_mb=128 if quick else 256)
    out["measured"] = meas
    peak = datasheet_peak(name) if device == "cuda" else None
    if peak is not None:
        out["flops"] = peak[0] * 1e12
        out["bytes_per_s"] = peak[1] * 1e12
        out["source"] = f"datasheet ({name}: {peak[0]:g} TFLOP/s dense fp16/bf16, {peak[1]:g} TB/s)"
    else:
        out["flops"] = meas["matmul_flops"]
        out["bytes_per_s"] = meas["copy_bytes_per_s"]
        out["source"] = (f"measured: {meas['matmul_dtype']} matmul {meas['matmul_n']}^3, "
                         f"copy of {meas['copy_mb']} MiB (best of clone / copy_ into a buffer)")
    return out


def fmt_rate(value: Optional[float], unit: str) -> str:
    """1.23e12, 'FLOP/s' -> '1.23 TFLOP/s'."""
    if value is None or value != value:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
