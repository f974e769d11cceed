"""fastbig's fused ops: each checks its inputs and dispatches to Triton, _C or the reference."""
from .lstm import lstm_cell, lstm_cell_step  # noqa: F401

__all__ = ["lstm_cell", "lstm_cell_step"]
from .attention import attention, attention_varlen  # noqa: F401,E402

__all__ += ["attention", "attention_varlen"]
from .conv_bn_relu import bn_act, conv_act, conv_bn_act, fold_bn  # noqa: F401,E402

__all__ += ["bn_act", "conv_act", "conv_bn_act", "fold_bn"]
from .lstm import lstm  # noqa: F401,E402

__all__ += ["lstm"]
