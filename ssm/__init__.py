"""ssm: a fast, exact SpatialSoftmaxWithLoss for NumPy and CuPy arrays (and DLPack ones).

Softmax over the class axis of ``(N, C, *spatial)`` logits, cross-entropy against
per-pixel labels or soft target maps, and the gradient, with Caffe2's
``SpatialSoftmaxWithLoss`` and PyTorch's ``cross_entropy`` options. See
``help(ssm.spatial_softmax_with_loss)`` and README.md. Softmax over the positions of
each (n, c) map too: ``spatial_softmax``, ``soft_argmax`` (keypoints),
``spatial_expectation`` and their gradients.

The public submodules (``ssm.ops``, the Caffe2 operator surface; ``ssm.bench``, the
benchmark; ``ssm.testing``, the CUDA simulator; ``ssm.torch`` and ``ssm.jax``, the
framework adaptors; ``ssm.dask``, the functions on Dask arrays) are attributes of
``ssm`` imported on first use (PEP 562), so that ``import ssm`` loads only the functions
above. ``ssm.loss_normalizer`` is the "mean" denominator of a shard (README, "Larger
than one machine").
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


# Spin iterations of a waiting libgomp thread before it sleeps (GOMP_SPINCOUNT): about
# 0.1-0.5 ms (a `pause` is 40-140 cycles), against libgomp's 300000 (milliseconds).
SPIN_COUNT = 10000


def _load_extension():
    """Import ssm._cpu, with its OpenMP runtime's threads spinning briefly when they wait.

    libgomp reads its wait settings once, when it loads. By default a waiting thread
    spins 300000 times (milliseconds) before it sleeps: on a machine where another
    process holds a core, it keeps its core busy while the thread it waits for has none
    (a (2, 21, 64, 64) fused call beside one busy process: 0.26 ms on one thread, 7 ms
    median on two). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up per
    parallel region instead (quiet machine, 2 threads: 0.085 -> 0.18 ms at that size,
    0.60 -> 0.84 ms at (4, 21, 128, 128)); GOMP_SPINCOUNT=10000 keeps the quiet times
    (0.09, 0.57 ms) and spins well under a millisecond. So ssm sets it as it loads its
    runtime, unless the user chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT), and restores the
    environment at once, for child processes and for runtimes loaded later. NumPy is
    imported first, so that a BLAS it brings keeps the user's setting. The wheel bundles
    a runtime of its own; a source build shares the system's libgomp, and then the
    setting applies to whatever uses it, or, if it was loaded before ssm, does not apply
    (``wait_policy`` says which). Other OpenMP runtimes keep their defaults."""
    import os

    if not _extension_files():  # say so before anything else can fail
        raise _no_extension(ModuleNotFoundError("No module named 'ssm._cpu'"))
    import numpy  # noqa: F401  (before the window below)
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    before = None if chosen else _openmp_runtimes()
    if not chosen:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        from . import _cpu
    except ImportError as exc:
        raise _no_extension(exc) from exc
    finally:
        if not chosen:
            del os.environ["GOMP_SPINCOUNT"]
    after = _openmp_runtimes() if before else None  # nothing loaded before: ours applies
    if chosen:
        policy = (f"as the environment sets it (OMP_WAIT_POLICY="
                  f"{os.environ.get('OMP_WAIT_POLICY')!r}, "
                  f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')!r})")
    elif before is not None and after is not None and not after - before:
        policy = ("the runtime's default (long spins): the OpenMP runtime was loaded before "
                  f"ssm; set GOMP_SPINCOUNT={SPIN_COUNT} before starting Python for ssm's")
    else:
        policy = f"spin {SPIN_COUNT} times, then sleep (GOMP_SPINCOUNT, set by ssm)"
    _cpu.wait_policy = policy


_load_extension()

import importlib as _importlib
import importlib.util as _importlib_util

from ._api import (
    cross_entropy,
    log_softmax,
    softmax,
    softmax_grad,
    spatial_softmax_with_loss,
    spatial_softmax_with_loss_and_grad,
    spatial_softmax_with_loss_grad,
)
from ._config import show_config
from ._distributed import loss_normalizer
from ._positions import (
    soft_argmax,
    soft_argmax_grad,
    spatial_expectation,
    spatial_softmax,
    spatial_softmax_grad,
)
from ._threads import get_num_threads, set_num_threads
from ._version import __version__

__all__ = [
    "__version__",
    "cross_entropy",
    "get_num_threads",
    "log_softmax",
    "loss_normalizer",
    "set_num_threads",
    "show_config",
    "softmax",
    "softmax_grad",
    "soft_argmax",
    "soft_argmax_grad",
    "spatial_expectation",
    "spatial_softmax",
    "spatial_softmax_grad",
    "spatial_softmax_with_loss",
    "spatial_softmax_with_loss_and_grad",
    "spatial_softmax_with_loss_grad",
]

# Public submodules, imported on first attribute access. ``dir(ssm)`` leaves out the
# adaptors to optional frameworks: listing them would import PyTorch, JAX, Dask (help(ssm)
# took 1.4 s) or fail where they are not installed.
_SUBMODULES = ("bench", "dask", "jax", "ops", "testing", "torch")
_OPTIONAL = ("dask", "jax", "torch")


def __getattr__(name):
    if name in _SUBMODULES:
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # the submodule exists but needs something
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    present = [m for m in _SUBMODULES if m not in _OPTIONAL
               and _importlib_util.find_spec(f"{__name__}.{m}") is not None]
    return sorted(set(globals()) | set(present))
