"""The kernels' inlined exp and log (ssm/_kernels.h: ssm_exp_nonpos and ssm_log_pos for
double, ssm_expf_nonpos and ssm_logf_pos for float), compiled as the kernels compile them,
on millions of arguments and the edge cases:

* the vectorised loop and the scalar one (a loop's remainder) give the same bits, so a
  pixel's value does not depend on where a tile's extent puts it (ssm.dask's chunks);
* exp, double: within 1 ulp of exp (long double expl) where FMA contracts the polynomial
  (x86-64-v3 and up: 0.95 ulp measured), 1.5 ulps on the baseline x86-64 (1.23); float:
  1.5 ulps (its polynomial's 1 ulp and the rounding to float);
* log: within 1 ulp of logl with FMA or without (double: 0.76 and 0.86 measured; float:
  0.75 and 0.84), on every binade, denormals included;
* exp: gradual underflow to denormals as exp does, 0 below half the least denormal and
  for -inf, NaN for NaN; log: +-0 -> -inf, +inf -> +inf, negative and NaN -> NaN.

gcc on x86-64 only (the question is what gcc makes of the functions in vector and in scalar
code, with the kernels' flags).
The function's text is taken from ssm/_kernels.h, so the test checks the shipped code.
The AVX-512 clone's float exp (ssm/_expf_table.h, a table-driven one) has its own harness,
tests/expf_t16_check.c, which includes the shipped header.
"""
import os
import platform
import re
import shutil
import subprocess

import pytest

from conftest import missing

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, os.pardir, "ssm", "_kernels.h")
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-Wall", "-Werror"]


def _function_text(name):
    with open(KERNELS) as f:
        src = f.read()
    def text(fn):
        m = re.search(r"^SSM_INLINE (?:double|float) " + fn + r"\((?:[^\n]*\}\n|.*?^\}\n)",
                      src, re.S | re.M)
        assert m, f"{fn} not found in {KERNELS}"
        return m.group(0)
    body = text(name)
    # a one-line wrapper (ssm_log_pos of ssm_log_any, say): the function it calls first
    inner = [text(fn) for fn in re.findall(r"\b(ssm_\w+_any)\(", body)]
    # the numeric constants it may use (#define SSM_2M64 ..., say), as in the header
    consts = re.findall(r"^#define SSM_\w+ [-+0-9.eEfx]+\b.*$", src, re.M)
    # the floors of the exps' arguments (variables, so that gcc clamps with one max)
    floors = re.findall(r"^SSM_OPAQUE \w+ \w+ = [-+0-9.eEf]+;$", src, re.M)
    consts += ["#define SSM_OPAQUE __attribute__((weak, visibility(\"hidden\")))"] + floors \
        if floors else []
    return "\n".join(consts + inner) + "\n" + body


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    except (OSError, AttributeError):
        return set()


ARCHES = [("x86-64", False, set()), ("x86-64-v3", True, {"avx2", "fma"}),
          ("x86-64-v4", True, {"avx512f"})]


# (function, C type, is it the log, max ulps where FMA contracts, max ulps without)
FUNCTIONS = [("ssm_exp_nonpos", "double", False, 1.0, 1.5),
             ("ssm_expf_nonpos", "float", False, 1.5, 1.5),  # 1 ulp and its rounding to float
             ("ssm_log_pos", "double", True, 1.0, 1.0),
             ("ssm_logf_pos", "float", True, 1.0, 1.0)]


@pytest.mark.parametrize("arch, fma, needs", ARCHES, ids=[a[0] for a in ARCHES])
@pytest.mark.parametrize("fn, ctype, log, ulps_fma, ulps_plain", FUNCTIONS,
                         ids=[f[0] for f in FUNCTIONS])
def test_inlined_exp_and_log(tmp_path, fn, ctype, log, ulps_fma, ulps_plain, arch, fma, needs):
    gcc = shutil.which("gcc")
    if gcc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("gcc on x86-64 only")
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run {arch} code")
    if not os.path.exists(KERNELS):
        missing("source-tree", "needs the source tree's ssm/_kernels.h beside tests/ (a test "
                               "run outside the clone: the wheel ships no C headers)")
    (tmp_path / "exp_fn.h").write_text("#include <math.h>\n#include <stdint.h>\n"
                                       + _function_text(fn))
    src = os.path.join(HERE, "exp_check.c")
    common = [gcc, *FLAGS, f"-march={arch}", f"-DT={ctype}", f"-DFN={fn}", "-I", str(tmp_path)]
    common += ["-DLOG"] if log else []
    objs = []
    for part, extra in (("VEC", ["-fopt-info-vec-optimized"]),
                        ("SCALAR", ["-fno-tree-vectorize"]), ("MAIN", [])):
        obj = str(tmp_path / f"{part}.o")
        info = subprocess.run(common + extra + [f"-DPART_{part}", "-c", src, "-o", obj],
                              check=True, capture_output=True, text=True).stderr
        if part == "VEC":  # else the comparison below would compare scalar with scalar
            assert "loop vectorized" in info, info
        objs.append(obj)
    exe = str(tmp_path / "exp_check")
    subprocess.run([gcc, "-fopenmp", *objs, "-o", exe, "-lm"], check=True)
    out = subprocess.run([exe, "300000"], check=True, capture_output=True, text=True).stdout
    r = dict(kv.split("=") for kv in out.split())
    assert int(r["n"]) > 2_000_000
    assert int(r["mismatch"]) == 0, out   # vector and scalar code agree bit for bit
    assert r["nan_ok"] == "1", out
    assert r["special_ok"] == "1", out
    assert int(r["nonzero_below"]) == 0, out
    limit = ulps_fma if fma else ulps_plain
    assert float(r["worst_ulps"]) <= limit, out
    assert float(r["worst_edge_ulps"]) <= limit, out


def test_table_expf_avx512(tmp_path):
    """The AVX-512 clone's float exp (ssm/_expf_table.h): its scalar function, gcc's
    vectorisation of it (positions' loops) and the hand-written sweep (ssm_sumexp_rows,
    masked tail at every n in [0, 40]) give the same bits; within 1.5 ulps of exp (1.052
    measured over every float in [-104, 0]); 0 below -104 and for -inf, NaN for NaN; no
    write past n. tests/expf_t16_check.c includes the shipped header."""
    gcc = shutil.which("gcc")
    if gcc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("gcc on x86-64 only")
    if "avx512f" not in _cpu_flags():
        pytest.skip("this CPU cannot run x86-64-v4 code")
    if not os.path.exists(KERNELS):
        missing("source-tree", "needs the source tree's ssm/_expf_table.h beside tests/")
    exe = str(tmp_path / "t16")
    subprocess.run([gcc, *FLAGS, "-Wextra", "-I", os.path.dirname(KERNELS),
                    os.path.join(HERE, "expf_t16_check.c"), "-o", exe, "-lm"], check=True)
    out = subprocess.run([exe, "37"], check=True, capture_output=True, text=True).stdout
    r = dict(kv.split("=") for kv in out.split())
    assert int(r["n"]) > 30_000_000
    assert int(r["mismatch"]) == 0, out
    assert r["nan_ok"] == "1" and r["special_ok"] == "1", out
    assert int(r["guard"]) == 0, out
    assert float(r["worst_ulps"]) <= 1.5, out
    assert float(r["worst_denormal_ulps"]) <= 1.5, out


def test_avx2_sweep_is_gccs_loop(tmp_path):
    """The AVX2 clone's hand-written float sum-of-exp sweep (ssm/_expf_avx2.h) gives the
    bits of gcc's loop over ssm_expf_nonpos in that clone, for the exps it stores and the
    sums, one row per pass or two: over every 37th float in [-104, 0] (about 30 million;
    its shifter, 191 more than ssm_expf_nonpos's, must round every one of them alike),
    edges and specials, and at every n in [0, 40] (its masked tail), with nothing written
    past n. tests/expf_avx2_check.c includes the shipped header."""
    gcc = shutil.which("gcc")
    if gcc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("gcc on x86-64 only")
    if not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU cannot run x86-64-v3 code")
    if not os.path.exists(KERNELS):
        missing("source-tree", "needs the source tree's ssm/_expf_avx2.h beside tests/")
    with open(KERNELS) as f:
        mask = re.search(r"^static const int32_t ssm_mask32\[16\] = .*;$", f.read(), re.M)
    assert mask, f"ssm_mask32 not found in {KERNELS}"
    (tmp_path / "exp_fn.h").write_text("#include <math.h>\n#include <stdint.h>\n"
                                       + _function_text("ssm_expf_nonpos") + mask.group(0) + "\n")
    exe = str(tmp_path / "v3")
    subprocess.run([gcc, *FLAGS, "-Wextra", "-I", str(tmp_path), "-I", os.path.dirname(KERNELS),
                    os.path.join(HERE, "expf_avx2_check.c"), "-o", exe, "-lm"], check=True)
    out = subprocess.run([exe, "37"], check=True, capture_output=True, text=True).stdout
    r = dict(kv.split("=") for kv in out.split())
    assert int(r["n"]) > 30_000_000
    assert int(r["mismatch"]) == 0, out
    assert r["nan_ok"] == "1", out
    assert int(r["guard"]) == 0, out
