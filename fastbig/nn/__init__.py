"""Drop-in modules with torch.nn's signatures and state_dict keys."""
from . import functional  # noqa: F401
from .attention import MultiheadAttention, SelfAttention  # noqa: F401
from .conv_bn_relu import ConvBn2d, ConvBnLeakyReLU2d, ConvBnReLU2d, ConvTransposeBnReLU2d  # noqa: F401
from .lstm import LSTM, LSTMCell  # noqa: F401

__all__ = ["functional", "MultiheadAttention", "SelfAttention", "ConvBnReLU2d", "ConvBnLeakyReLU2d", "ConvBn2d",
           "ConvTransposeBnReLU2d", "LSTM", "LSTMCell"]
