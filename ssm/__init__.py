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
