"""ssm: a fast, exact SpatialSoftmaxWithLoss for NumPy (and, later, CuPy) arrays.

Softmax over the class axis of ``(N, C, *spatial)`` logits, cross-entropy against
per-pixel labels or soft target maps, and the gradient, with Caffe2's
``SpatialSoftmaxWithLoss`` and PyTorch's ``cross_entropy`` options. See
``help(ssm.spatial_softmax_with_loss)`` and README.md.

The public submodules (``ssm.ops``, the Caffe2 operator surface; ``ssm.bench``, the
benchmark; ``ssm.testing`` where installed) are attributes of ``ssm`` imported on first
use (PEP 562), so that ``import ssm`` loads only the functions above.
"""


def _extension_files():
    import os
    from importlib.machinery import EXTENSION_SUFFIXES
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(here, "_cpu" + s) for s in EXTENSION_SUFFIXES
            if os.path.exists(os.path.join(here, "_cpu" + s))]


def _no_extension(exc: ImportError) -> ImportError:
    """What to say when the compiled extension ssm._cpu cannot be imported."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    built = _extension_files()
    if built:
        return ImportError(f"ssm: its compiled extension {built[0]} exists but could not be "
                           f"loaded ({exc}); reinstall ssm, or report this with the output "
                           "of `pip show -f ssm`")
    if os.path.exists(os.path.join(os.path.dirname(here), "setup.py")):
        return ImportError(
            f"ssm: this is the source tree of ssm ({here}), which has no compiled extension, "
            f"and Python found it before the installed ssm because it runs from "
            f"{os.path.dirname(here)}. Run Python from another folder (`cd` elsewhere) to "
            "use the installed ssm; the console script `ssm-bench` works from any folder. "
            "To work on the source tree itself, build it in place: `pip install -e .`")
    return ImportError(f"ssm: the compiled extension ssm._cpu is missing from {here}; "
                       f"reinstall ssm ({exc})")


def _openmp_runtimes():
    """Paths of the OpenMP runtimes mapped into this process (None where unknown)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f
                    if any(k in line for k in ("libgomp", "libomp", "libiomp"))}
    except OSError:
        return None


def _load_extension():
    """Import ssm._cpu, with its OpenMP runtime's threads sleeping when they wait.

    An OpenMP runtime reads OMP_WAIT_POLICY once, when it loads. By default libgomp's
    idle threads spin: on a machine where another process holds a core, a waiting thread
    then keeps its core busy while the thread it waits for has none (a (2, 21, 64, 64)
    fused call beside one busy process: 0.26 ms on one thread, 7 ms median on two
    spinning, 0.13 ms on two passive). So ssm asks for PASSIVE as it loads its runtime,
    unless the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT), and restores the
    environment at once, for child processes and for runtimes loaded later. NumPy is
    imported first, so that a BLAS it brings keeps the user's setting. The wheel bundles
    a runtime of its own; a source build shares the system's libgomp, and then the
    policy applies to whatever uses it, or, if it was loaded before ssm, does not apply
    (``wait_policy`` says which)."""
    import os

    if not _extension_files():  # say so before anything else can fail
        raise _no_extension(ModuleNotFoundError("No module named 'ssm._cpu'"))
    import numpy  # noqa: F401  (before the window below)
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    before = _openmp_runtimes()
    if not chosen:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from . import _cpu
    except ImportError as exc:
        raise _no_extension(exc) from exc
    finally:
        if not chosen:
            del os.environ["OMP_WAIT_POLICY"]
    after = _openmp_runtimes()
    if chosen:
        policy = f"as the environment sets it (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')!r}, " \
                 f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')!r})"
    elif before is not None and after is not None and not after - before:
        policy = ("the runtime's default (spinning): the OpenMP runtime was loaded before ssm; "
                  "set OMP_WAIT_POLICY=passive before starting Python for ssm's")
    else:
        policy = "passive (set by ssm)"
    _cpu.wait_policy = policy


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
