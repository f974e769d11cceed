"""fastbig: fused kernels behind drop-in PyTorch layers."""
__version__ = "0.1.0"

from . import backends  # noqa: E402
from . import errors  # noqa: E402
from ._extension import build_info  # noqa: E402
from . import ops  # noqa: E402
from . import nn  # noqa: E402
# Bound after the submodule import, so the package attribute is the function, not the module.
from .accelerate import accelerate  # noqa: E402

__all__ = ["__version__", "backends", "errors", "build_info", "ops", "nn", "accelerate", "models"]


def __getattr__(name):
    # models is imported lazily: it pulls in every model family.
    if name == "models":
        import importlib
        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'fastbig' has no attribute {name!r}")
