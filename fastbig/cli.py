"""`fastbig info | demo | bench | train | evaluate`."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torch CUDA": torch.version.cuda or "none (CPU build)"}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover
        out["triton"] = f"not importable ({type(e).__name__})"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["cuDNN"] = str(cudnn) if cudnn else "not available"
    if torch.cuda.is_available():
        out["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        out["GPU"] = "none visible"
    out["CPU threads"] = str(torch.get_num_threads())
    return out


def backend_report() -> list[tuple[str, bool, str]]:
    """(backend, usable here, why not) for each backend, on this machine's devices."""
    import torch

    from . import backends

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [("reference", True, "pure PyTorch, runs everywhere")]
    ok, why = backends.triton_available(dev)
    rows.append(("triton", ok, why or f"Triton kernels on {dev} tensors" +
                 (" (interpreter)" if dev == "cpu" else "")))
    ok, why = backends.extension_available("cuda")
    if ok and not torch.cuda.is_available():
        ok, why = False, "fastbig._C has CUDA kernels, but no GPU is visible"
    rows.append(("cuda", ok, why or "fastbig._C CUDA kernels"))
    ok, why = backends.extension_available("cpu")
    rows.append(("cpu", ok, why or "fastbig._C C++ kernels"))
    return rows


def info(argv=None) -> int:
    argparse.ArgumentParser(prog="fastbig info", description="What fastbig was built with and "
                            "which backends can run here").parse_args(argv)
    import fastbig
    from . import backends

    print(f"fastbig {fastbig.__version__}")
    for k, v in _versions().items():
        print(f"  {k:<12} {v}")
    bi = fastbig.build_info()
    print("extension fastbig._C")
    if bi["loaded"]:
        kind = f"CUDA {bi['cuda_built']} for sm_{', sm_'.join(a.replace('.', '') for a in bi['cuda_archs'])}" \
            if bi["cuda"] else "CPU only (built without CUDA)"
        print(f"  build        {kind}")
        print(f"  built with   torch {bi['torch_built']}")
        print(f"  ops          {', '.join(bi['ops']) or '(none)'}")
    else:
        print(f"  not loaded: {bi['error']}")
    print(f"backends (FASTBIG_BACKEND={os.environ.get('FASTBIG_BACKEND', 'auto')}, "
          f"in force: {backends.current()})")
    for name, ok, why in backend_report():
        print(f"  {name:<10} {'yes' if ok else 'no '}  {why}")
    return 0


def demo(argv=None) -> int:
    """The main job: train a seed model through fastbig layers, then the quick benchmark table."""
    ap = argparse.ArgumentParser(prog="fastbig demo")
    ap.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    args = ap.parse_args(argv)
    info([])
    print()
    from .train import demo_main
    rc = demo_main()
    if not args.no_bench:
        print()
        from .bench import main as bench_main
        rc = bench_main(["--quick"]) or rc
    return rc


# The commands: name -> (what runs it, one line of help). "module:function" targets are imported
# when the command runs (bench and train pull in much); a bare name is a function of this module.
COMMANDS = {
    "info": ("info", "versions, what fastbig._C was built with, which backends run here"),
    "demo": ("demo", "the main job: train MNISTNet through fastbig layers, then benchmarks"),
    "bench": (".bench:main", "benchmark fastbig against eager PyTorch, SDPA, cuDNN, torch.compile"),
    "train": (".train:main", "train a model: fastbig train MODEL [options]"),
    "evaluate": (".train:evaluate_main", "score a checkpoint: fastbig evaluate CKPT"),
}


def _command(name):
    target = COMMANDS[name][0]
    if ":" not in target:
        return globals()[target]
    module, func = target.split(":")
    return getattr(importlib.import_module(module, __package__), func)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: fastbig {{{','.join(COMMANDS)}}} [options]\n\n"
              + "\n".join(f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()))
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in COMMANDS:
        return _command(cmd)(rest)
    print(f"fastbig: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
