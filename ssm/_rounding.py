"""float64 results (a reduced loss, a temperature's gradient) rounded once to an output dtype.

NumPy rounds a double once to float16, float32 and float64. ml_dtypes rounded a double to
bfloat16 twice, through float32, before 0.7 (1 + 2**-8 + 2**-40 became the midpoint
1 + 2**-8, then 1.0), and once since: the cast is not relied on. The double is rounded to
float32 *to odd* (truncated, its last bit set where inexact), and that float to bfloat16
to nearest even, the one rounding of the double itself: with 16 bits to spare the odd bit
stands for everything below it (Boldo and Melquiond's round-to-odd). The GPU does the same
(from_double in ssm/cuda/common.cuh).
"""
import numpy as np


# NumPy's own float dtypes, whose casts from float64 round once. (A set: membership by
# hash, where dtype.name costs microseconds, a tenth of a small call.)
_NUMPY_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def round_once(a, dtype) -> np.ndarray:
    """NumPy ``a`` (float64, any shape) as ``dtype``, each value rounded once."""
    dtype = np.dtype(dtype)
    a = np.asarray(a, dtype=np.float64)
    if dtype in _NUMPY_FLOATS or dtype.name != "bfloat16":
        return a.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        f = a.astype(np.float32)
        away = np.abs(f.astype(np.float64)) > np.abs(a)   # rounded away from zero
        f = np.where(away, np.nextafter(f, np.float32(0)), f)  # inf -> the largest float
        odd = (f.astype(np.float64) != a) & ~np.isnan(a)
    bits = f.view(np.uint32) | odd.astype(np.uint32)
    return np.asarray(bits.view(np.float32).astype(dtype))
