"""ssm: a fast, exact SpatialSoftmaxWithLoss for NumPy (and, later, CuPy) arrays.

Softmax over the class axis of ``(N, C, *spatial)`` logits, cross-entropy against
per-pixel labels or soft target maps, and the gradient, with Caffe2's
``SpatialSoftmaxWithLoss`` and PyTorch's ``cross_entropy`` options. See
``help(ssm.spatial_softmax_with_loss)`` and README.md.

The public submodules (``ssm.ops``, the Caffe2 operator surface; ``ssm.bench``, the
benchmark; ``ssm.testing`` where installed) are attributes of ``ssm`` imported on first
use (PEP 562), so that ``import ssm`` loads only the functions above.
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


def _load_extension():
    """Import ssm._cpu, with its OpenMP runtime's threads sleeping when they wait.

    libgomp reads OMP_WAIT_POLICY once, when it loads (with the extension, unless
    something loaded the same library before; the wheel bundles a copy of its own). By
    default its idle threads spin: on a machine where another process holds a core, a
    waiting thread then keeps its core busy while the thread it waits for has none
    (a (2, 21, 64, 64) fused call beside one busy process: 0.26 ms on one thread, 7 ms
    median on two spinning, 0.13 ms on two passive). So ssm asks for PASSIVE unless the
    user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT), and restores the environment
    at once, so that other libraries and child processes see the user's."""
    import os
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if not chosen:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from . import _cpu
    except ImportError as exc:
        raise _no_extension(exc) from exc
    finally:
        if not chosen:
            del os.environ["OMP_WAIT_POLICY"]
    _cpu.wait_policy = (os.environ.get("OMP_WAIT_POLICY") or "GOMP_SPINCOUNT") if chosen \
        else "passive (set by ssm)"


_load_extension()

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
_SUBMODULES = ("bench", "jax", "ops", "testing", "torch")


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
