"""fastbig: fused kernels behind drop-in PyTorch layers."""
__version__ = "0.1.0"

from . import backends  # noqa: E402
from ._extension import build_info  # noqa: E402
from . import ops  # noqa: E402
from . import nn  # noqa: E402

__all__ = ["__version__", "backends", "build_info", "ops", "nn"]


def __getattr__(name):
    # models and accelerate are imported lazily: they pull in more of torch.nn.
    if name == "models":
        import importlib
        return importlib.import_module(".models", __name__)
    if name == "accelerate":
        from .accelerate import accelerate
        return accelerate
    raise AttributeError(f"module 'fastbig' has no attribute {name!r}")
