"""Input checks shared by the ops: each error names the argument, the expected and the actual."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ..errors import DtypeError  # noqa: F401  (raised here; importable from here as before)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, *, dtypes: Optional[Iterable[torch.dtype]] = FLOAT_DTYPES,
                 dim: Optional[int | Sequence[int]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise DtypeError(f"{op}: {name} must have a floating dtype ({names}), got {t.dtype}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if t.dim() not in dims:
            exp = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{op}: {name} must be {exp}, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    """Each of ``others`` must have ref's dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                               f"expected all tensors on one device")
        if t.dtype != ref.dtype:
            raise DtypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            f"expected one dtype")


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
