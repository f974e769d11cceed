"""fastbig's fused ops: each checks its inputs and dispatches to Triton, _C or the reference."""
from .lstm import lstm_cell  # noqa: F401

__all__ = ["lstm_cell"]
from .attention import attention, attention_varlen  # noqa: F401,E402

__all__ += ["attention", "attention_varlen"]
from .lstm import lstm  # noqa: F401,E402

__all__ += ["lstm"]
