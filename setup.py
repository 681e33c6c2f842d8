"""Build of the ssm CPU extension; the only place with compiler flags.

-O3 -fopenmp vectorises the kernels' loops, whose exp and log are inlined (see the
design block of ssm/_kernels.h: they call no libm function); -fno-math-errno keeps
any libm call gcc may emit free of errno, and libm stays linked. -fno-trapping-math
lets gcc if-convert the branches of the inlined exp and log (without it the AVX2 and SSE2 clones ran the exp
loop scalar: only AVX-512 could mask them); ssm never unmasks FP exceptions, and
IEEE results, NaN and inf are unchanged. -falign-functions=64 starts every function on
a cache line, so that a hot loop's place in the 64-byte fetch blocks no longer depends on
how much code precedes its function: adding the half positions driver moved the float
ones 32 bytes and made soft_argmax 6% and softmax 4% slower on a Zen 3; with it those were
back within 1% and the fused loss 4% faster (see
benchmarks/results/2026-12-01-amd-epyc-zen3-avx2-session10/README.md). Never -ffast-math (gcc 12 links crtfastmath,
which flushes denormals in the whole process) and never -march=native (the wheel
would die with SIGILL on older CPUs): the fast paths come from target_clones.
SSM_CFLAGS adds flags for local experiments only; SSM_DEBUG=1 builds with -O0 -g
and Cython's bounds checks. SSM_CFLAGS=-DSSM_FORCE_CLONE=x86-64-v3 (or x86-64-v4,
x86-64) builds the tile drivers for that one ISA instead of the three clones, so that
the AVX2 (or baseline) code can be timed on an AVX-512 machine; ssm.show_config()
then says so. Such a build dies with SIGILL on a CPU without that ISA.
"""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("SSM_DEBUG") == "1"
if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
elif sys.platform == "darwin":
    compile_args, link_args = ["-O3", "-fno-math-errno", "-Xpreprocessor", "-fopenmp"], ["-lomp"]
else:
    compile_args = ["-O0", "-g"] if debug else ["-O3", "-g0", "-falign-functions=64"]
    compile_args += ["-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-Wno-unused-function"]
    link_args = ["-fopenmp"]
compile_args += os.environ.get("SSM_CFLAGS", "").split()
libraries = [] if sys.platform == "win32" else ["m"]

# Recorded in the extension for ssm.show_config() (a C string literal; the source tree
# is never written to).
build_flags = (f"compile: {' '.join(compile_args)}; "
               f"link: {' '.join(link_args + [f'-l{lib}' for lib in libraries])}")
build_flags = build_flags.replace("\\", "/").replace('"', "'")

ext = Extension(
    "ssm._cpu",
    ["ssm/_cpu.pyx"],
    include_dirs=["ssm", np.get_include()],
    depends=["ssm/_kernels.h", "ssm/_kernels_impl.h", "ssm/_expf_table.h", "ssm/_expf_avx2.h",
             "ssm/_sumexp_rows.h", "ssm/_labels_impl.h", "ssm/_threads.h", "ssm/_floors.h",
             "ssm/_half.h", "ssm/_half_impl.h", "ssm/_positions.h", "ssm/_positions_impl.h",
             "ssm/_cpu.pxd"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION"),
                   ("SSM_BUILD_FLAGS", f'"{build_flags}"')],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=libraries,
)

directives = {"language_level": 3}
if debug:
    directives.update(boundscheck=True, wraparound=True)

setup(ext_modules=cythonize([ext], compiler_directives=directives))
