"""The errors fastbig raises that users catch by type (beside ValueError, TypeError and
RuntimeError, which it raises as torch.nn does)."""
from __future__ import annotations

__all__ = ["DtypeError"]


class DtypeError(TypeError, RuntimeError):
    """A tensor of the wrong dtype. A TypeError, as fastbig's checks raise, and a RuntimeError, as
    torch.nn raises for the same mismatch ("mat1 and mat2 must have the same dtype", "Input type
    (double) and bias type (float) should be the same"): code written for either catches it."""
