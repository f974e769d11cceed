"""Loads fastbig._C once and says what it was built with, and why anything is missing."""
from __future__ import annotations

import torch

_C = None
_error = None
try:
    from . import _C  # noqa: F401  (registers the torch.ops.fastbig.* schemas and kernels)
except Exception as e:  # ImportError, or an ABI mismatch with the installed torch
    _C = None
    _error = f"{type(e).__name__}: {e}"


def _read_build_info() -> dict:
    if _C is None:
        return {"loaded": False, "cuda": False, "cuda_archs": [], "torch_built": None,
                "cuda_built": None, "ops": [],
                "error": _error or "not built (run `pip install --no-build-isolation -e .`)"}
    raw = dict(_C.build_info())
    archs = [a for a in str(raw.get("cuda_archs", "")).replace(",", ";").split(";") if a]
    ops = sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("fastbig::")})
    return {"loaded": True, "cuda": bool(raw.get("cuda", False)), "cuda_archs": archs,
            "torch_built": raw.get("torch_version"), "cuda_built": raw.get("cuda_version") or None,
            "ops": ops, "error": None}


_BUILD_INFO = _read_build_info()
_OPS = frozenset(_BUILD_INFO["ops"])


def build_info() -> dict:
    """What fastbig._C contains: loaded?, cuda?, archs, torch version it was built against, ops."""
    return dict(_BUILD_INFO)


def has_op(name: str) -> bool:
    return name in _OPS


def require_extension(op: str):
    if _C is None:
        raise RuntimeError(f"fastbig.{op}: the C++ extension fastbig._C is not available: {_error}")
