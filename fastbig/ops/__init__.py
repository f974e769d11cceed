"""fastbig's fused ops: each checks its inputs and dispatches to Triton, _C or the reference."""
from .attention import attention, attention_varlen  # noqa: F401
from .conv_bn_relu import bn_act, conv_act, conv_bn_act, fold_bn  # noqa: F401
from .lstm import lstm_cell_pointwise, lstm_cell_step, lstm_layer  # noqa: F401
from .lstm import lstm, lstm_cell  # noqa: F401,E402  (old names of lstm_layer, lstm_cell_pointwise)

__all__ = ["attention", "attention_varlen", "bn_act", "conv_act", "conv_bn_act", "fold_bn", "lstm_cell_pointwise",
           "lstm_cell_step", "lstm_layer", "lstm", "lstm_cell"]
