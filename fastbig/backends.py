"""Which implementation of an op runs.

Names: ``auto`` (the fastest path that supports the inputs), ``reference`` (the pure-PyTorch
oracle), ``triton`` (Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``),
``cuda`` (the C++/CUDA extension on GPU tensors), ``cpu`` (the C++ extension on CPU tensors).

Choose with the ``FASTBIG_BACKEND`` environment variable or, per thread, with::

    with fastbig.backends.use("reference"):
        ...

A forced backend that cannot take the inputs raises; ``auto`` falls back to the reference
with one warning per (op, reason).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

_local = threading.local()
_warned: set = set()
_warned_lock = threading.Lock()


class FastbigFallbackWarning(UserWarning):
    """A fast path could not take the inputs; the reference ran instead."""


def _check(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name.lower()


def _current() -> str:
    """The backend in force for this thread: a ``use()`` block, else FASTBIG_BACKEND, else auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTBIG_BACKEND", "auto") or "auto"
    try:
        return _check(env)
    except ValueError:
        raise ValueError(f"FASTBIG_BACKEND: expected one of {BACKENDS}, got {env!r}") from None


def current() -> str:
    """The backend in force for this thread: a ``use()`` block, else FASTBIG_BACKEND, else auto.

    Under torch.compile the choice is made once, at trace time, and baked into the graph.
    """
    if _compiling():
        return _current_const()
    return _current()


def _compiling() -> bool:
    try:
        import torch
        return torch.compiler.is_compiling()
    except Exception:  # pragma: no cover
        return False


def _current_const() -> str:
    return _current()


try:  # dynamo evaluates this at trace time and treats the result as a constant
    import torch as _torch
    _current_const = _torch.compiler.assume_constant_result(_current_const)
except Exception:  # pragma: no cover
    pass


@contextlib.contextmanager
def use(name: str):
    """Force a backend inside the block, for this thread only."""
    name = _check(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available(device) -> tuple[bool, str]:
    """Can a Triton kernel run on tensors of this device? Returns (ok, reason-if-not)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton ships with torch on Linux
        return False, f"triton is not importable ({e})"
    dev_type = getattr(device, "type", device)
    if dev_type == "cuda":
        return True, ""
    if dev_type == "cpu":
        if triton_interpret():
            return True, ""
        return False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return False, f"Triton does not run on {dev_type} tensors"


def extension_available(device) -> tuple[bool, str]:
    """Can the C++/CUDA extension run on tensors of this device?"""
    from . import _extension

    info = _extension._BUILD_INFO
    if not info["loaded"]:
        return False, f"fastbig._C is not loaded ({info['error']})"
    dev_type = getattr(device, "type", device)
    if dev_type == "cpu":
        return True, ""
    if dev_type == "cuda":
        if info["cuda"]:
            return True, ""
        return False, "fastbig._C was built without CUDA"
    return False, f"fastbig._C has no kernels for {dev_type} tensors"


def extension_backend(op: str, device, schema: str) -> str:
    """The backend for an op of the C++/CUDA extension (every op but attention): ``cpu`` or
    ``cuda`` for tensors of that device when fastbig._C is loaded and holds the ``schema``
    (``fastbig::<schema>``), else the reference as ``resolve`` decides (a forced backend raises,
    ``auto`` warns once). ``op`` names the op in warnings and errors."""
    from ._extension import has_op

    dev_type = getattr(device, "type", device)
    fast = {}
    if dev_type in ("cpu", "cuda"):
        fast[dev_type] = extension_available(device) if has_op(schema) else (False, f"{schema} not built")
    return resolve(op, device, fast=fast)


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that ``auto`` fell back to the reference."""
    key = (op, reason)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"fastbig.{op}: no fast path for these inputs ({reason}); "
                  f"running the PyTorch reference", FastbigFallbackWarning, stacklevel=3)


def _reset_warnings() -> None:
    """For tests: forget which fallbacks have warned."""
    with _warned_lock:
        _warned.clear()


def resolve(op: str, device, *, fast: dict, reason_if_none: str = "") -> str:
    """Pick the implementation for ``op`` given the forced/auto backend.

    ``fast`` maps backend name -> (ok, reason) for the fast paths this op has, in order of
    preference for ``auto``. Returns the chosen backend name ("reference" included).
    A forced backend that is not ok raises RuntimeError naming why.
    """
    name = current()
    if name == "reference":
        return "reference"
    if name != "auto":
        if name not in fast:
            raise RuntimeError(f"fastbig.{op}: backend {name!r} has no implementation of this op "
                               f"(available: reference, {', '.join(fast) or 'none'})")
        ok, why = fast[name]
        if not ok:
            raise RuntimeError(f"fastbig.{op}: backend {name!r} cannot run these inputs: {why}")
        return name
    reasons = []
    for cand, (ok, why) in fast.items():
        if ok:
            return cand
        reasons.append(f"{cand}: {why}")
    warn_fallback(op, "; ".join(reasons) or reason_if_none or "no fast path")
    return "reference"
