"""ssm: a fast, exact SpatialSoftmaxWithLoss for NumPy (and, later, CuPy) arrays.

Softmax over the class axis of ``(N, C, *spatial)`` logits, cross-entropy against
per-pixel labels or soft target maps, and the gradient, with Caffe2's
``SpatialSoftmaxWithLoss`` and PyTorch's ``cross_entropy`` options. See
``help(ssm.spatial_softmax_with_loss)`` and README.md.

The public submodules (``ssm.ops``, the Caffe2 operator surface; ``ssm.bench``, the
benchmark; ``ssm.testing`` where installed) are attributes of ``ssm`` imported on first
use (PEP 562), so that ``import ssm`` loads only the functions above.
"""
import importlib as _importlib
import importlib.util as _importlib_util

from ._api import (
    log_softmax,
    softmax,
    softmax_grad,
    spatial_softmax_with_loss,
    spatial_softmax_with_loss_and_grad,
    spatial_softmax_with_loss_grad,
)
from ._config import show_config
from ._threads import get_num_threads, set_num_threads
from ._version import __version__

__all__ = [
    "__version__",
    "get_num_threads",
    "log_softmax",
    "set_num_threads",
    "show_config",
    "softmax",
    "softmax_grad",
    "spatial_softmax_with_loss",
    "spatial_softmax_with_loss_and_grad",
    "spatial_softmax_with_loss_grad",
]

# Public submodules, imported on first attribute access; a name whose module is absent
# (``testing`` before it exists) is simply a missing attribute.
_SUBMODULES = ("bench", "ops", "testing")


def __getattr__(name):
    if name in _SUBMODULES:
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # the submodule exists but needs something
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    present = [m for m in _SUBMODULES if _importlib_util.find_spec(f"{__name__}.{m}") is not None]
    return sorted(set(globals()) | set(present))
