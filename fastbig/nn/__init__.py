"""Drop-in modules with torch.nn's signatures and state_dict keys."""
__all__ = []
from . import functional  # noqa: F401,E402
from .attention import MultiheadAttention, SelfAttention  # noqa: F401,E402

__all__ += ["functional", "MultiheadAttention", "SelfAttention"]
from .conv_bn_relu import ConvBn2d, ConvBnLeakyReLU2d, ConvBnReLU2d, ConvTransposeBnReLU2d  # noqa: F401,E402

__all__ += ["ConvBnReLU2d", "ConvBnLeakyReLU2d", "ConvBn2d", "ConvTransposeBnReLU2d"]
from .lstm import LSTM, LSTMCell  # noqa: F401,E402

__all__ += ["LSTM", "LSTMCell"]
