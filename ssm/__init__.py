"""ssm: a fast, exact SpatialSoftmaxWithLoss for NumPy (and, later, CuPy) arrays.

Softmax over the class axis of ``(N, C, *spatial)`` logits, cross-entropy against
per-pixel labels or soft target maps, and the gradient, with Caffe2's
``SpatialSoftmaxWithLoss`` and PyTorch's ``cross_entropy`` options. See
``help(ssm.spatial_softmax_with_loss)`` and README.md.
"""


def _no_extension(exc: ImportError) -> ImportError:
    """What to say when the compiled extension ssm._cpu cannot be imported."""
    import os
    from importlib.machinery import EXTENSION_SUFFIXES
    here = os.path.dirname(os.path.abspath(__file__))
    built = [s for s in EXTENSION_SUFFIXES if os.path.exists(os.path.join(here, "_cpu" + s))]
    if built:
        return ImportError(f"ssm: its compiled extension {os.path.join(here, '_cpu' + built[0])} "
                           f"exists but could not be loaded ({exc}); reinstall ssm, or report "
                           "this with the output of `pip show -f ssm`")
    if os.path.exists(os.path.join(os.path.dirname(here), "setup.py")):
        return ImportError(
            f"ssm: this is the source tree of ssm ({here}), which has no compiled extension, "
            f"and Python found it before the installed ssm because it runs from "
            f"{os.path.dirname(here)}. Run Python from another folder (`cd` elsewhere) to "
            "use the installed ssm; the console script `ssm-bench` works from any folder. "
            "To work on the source tree itself, build it in place: `pip install -e .`")
    return ImportError(f"ssm: the compiled extension ssm._cpu is missing from {here}; "
                       f"reinstall ssm ({exc})")


try:
    from . import _cpu  # the compiled extension: every module below needs it
except ImportError as _exc:
    raise _no_extension(_exc) from _exc

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
