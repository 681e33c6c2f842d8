#!/usr/bin/env bash
# The whole GPU verification in one command, for the day a GPU machine is lent.
#
#   OUT=/some/folder bash benchmarks/gpu/device_check.sh            # on the GPU machine
#   OUT=/some/folder bash benchmarks/gpu/device_check.sh --dry-run  # anywhere (CI does)
#
# For a machine with an NVIDIA GPU, CuPy, nvcc, compute-sanitizer and 16 cores but no
# network (nothing is fetched: Cython, setuptools, NumPy, pytest and CuPy must be there).
# From the repository root, in order, each step with its own time limit so that the whole
# fits in about 8 minutes:
#   1. the machine: nvidia-smi, nvcc, Python packages;
#   2. install ssm from this tree (no build isolation, no dependencies);
#   3. the GPU tests on the device (pytest -m gpu);
#   4. compute-sanitizer memcheck, racecheck, initcheck and synccheck over
#      benchmarks/gpu/sanitize_subset.py (every kernel, every dtype, small shapes);
#   5. the GPU benchmark on the three workloads (ssm vs a device-to-device copy of the
#      same bytes and vs PyTorch, CUDA events);
#   6. an Nsight Compute profile (speed of light, memory, occupancy) of one call of each
#      op (benchmarks/gpu/profile_ops.py), where ncu is installed;
#   7. the CPU thread sweep to 16 threads on the VOC-like workload.
# DEADLINE (seconds, default 480) bounds the whole: a step gets at most what is left of it
# (less 20 s to pack the results), and steps that no longer fit are skipped, so the
# results always come back inside the device tool's time. Everything goes to $OUT as summary.md (one line per step: passed, failed or skipped,
# seconds) and device_check.tar.gz (every log, JSON and plot): the device tool brings back
# at most 8 files. The exit status is 0 only if every step that ran passed.
#
# --dry-run runs the same steps with stand-ins that need no GPU: the GPU tests on the CUDA
# simulator (ssm.testing.cudasim) where it is installed, the sanitizer commands echoed
# instead of run, the benchmarks on a tiny shape on the CPU. CI runs it
# (tests/test_device_check.py), so that the script works the day it matters.
set -uo pipefail
cd "$(dirname "$0")/../.."

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
logs=$(mktemp -d)
py=${PYTHON:-python3}
tests_dir=$(mktemp -d)  # the tests run from outside the tree: ./ssm has no compiled extension
export dry logs py tests_dir
summary="$logs/summary.md"
failed=0
start_all=$SECONDS

{
    echo "# ssm device check, $(date -u +%Y-%m-%dT%H:%MZ)$([ $dry = 1 ] && echo ' (dry run)')"
    echo
    echo "| step | result | seconds | log |"
    echo "|---|---|---:|---|"
} > "$summary"

deadline=${DEADLINE:-480}
step() {  # step NAME LIMIT_S LOG COMMAND...: run, time, record
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS rc left=$((deadline - 20 - (SECONDS - start_all)))
    if [ $left -lt 10 ]; then
        skip "$name" "out of time (DEADLINE=${deadline}s)"
        failed=1
        return
    fi
    [ $left -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    # a child bash, so that the step may be one of the functions below (exported)
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$logs/$log" 2>&1
    rc=$?
    local result="passed"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result="TIMED OUT"
    elif [ $rc -ne 0 ]; then
        result="FAILED (exit $rc)"
    fi
    [ "$result" = passed ] || failed=1
    tail -3 "$logs/$log" | sed 's/^/   /'
    echo "| $name | $result | $((SECONDS - t0)) | $log |" >> "$summary"
}

skip() {  # skip NAME WHY
    echo "== $1: skipped ($2)"
    echo "| $1 | skipped: $2 | 0 | |" >> "$summary"
}

machine() {
    nvidia-smi || true
    nvcc --version || true
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
    "$py" -c 'import sys, platform; print(sys.version, platform.platform())'
    "$py" -m pip list 2>/dev/null | grep -iE '^(numpy|cupy[-a-z0-9]*|torch|cython|setuptools|pytest) ' || true
    nproc
}

export -f machine
step "machine" 30 machine.txt machine
cp -r tests pyproject.toml "$tests_dir/"

if [ $dry = 1 ]; then
    skip "install ssm from the tree" "dry run: the ssm under test is the one installed"
else
    failed_before=$failed
    step "install ssm from the tree" 180 install.txt \
        "$py" -m pip install --no-build-isolation --no-deps --force-reinstall .
    if ! (cd "$tests_dir" && "$py" -c "import ssm._cpu") 2> /dev/null; then
        # an older setuptools there may reject pyproject.toml's metadata (PEP 639): build
        # the extension in place in a copy without it, and use that copy
        inplace() {
            cp -r ssm setup.py MANIFEST.in "$build_dir/" && cd "$build_dir" \
                && "$py" setup.py build_ext --inplace
        }
        build_dir=$(mktemp -d)
        export -f inplace
        export build_dir
        failed=$failed_before  # the fallback's own result counts instead
        step "build in place instead (no pyproject metadata)" 180 install_inplace.txt inplace
        export PYTHONPATH="$build_dir${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

run_tests() {
    cd "$tests_dir" && "$py" -m pytest -q -p no:cacheprovider -rs "$@"
}
export -f run_tests
if [ $dry = 1 ]; then
    if "$py" -c 'import ssm.testing.cudasim' 2> /dev/null; then
        step "GPU tests (on the CUDA simulator)" 600 gpu_tests.txt \
            run_tests tests/test_gpu.py -k "cudasim and test_backend_matches_cpu" -x
    else
        skip "GPU tests" "dry run and no CUDA simulator (ssm.testing.cudasim) installed"
    fi
else
    step "GPU tests (pytest -m gpu)" 150 gpu_tests.txt run_tests -m gpu tests
fi

sanitize() {  # sanitize TOOL: the subset under compute-sanitizer; any reported error fails
    # memcheck sees every call; the slower racecheck, initcheck and synccheck a quick subset
    local subset=(benchmarks/gpu/sanitize_subset.py)
    [ "$1" = memcheck ] || subset+=(--quick)
    local cmd=(compute-sanitizer --tool "$1" --error-exitcode 3 "$py" "${subset[@]}")
    if [ $dry = 1 ]; then
        echo "would run: ${cmd[*]}"
        "$py" "${subset[@]}" --dry-run
    else
        "${cmd[@]}"
    fi
}
export -f sanitize
for tool in memcheck racecheck initcheck synccheck; do
    if [ $dry = 1 ] || command -v compute-sanitizer > /dev/null; then
        step "compute-sanitizer $tool" 60 "sanitizer_$tool.txt" sanitize "$tool"
    else
        skip "compute-sanitizer $tool" "compute-sanitizer is not on PATH"
        failed=1
    fi
done

profile() {  # Nsight Compute over one call of each op (VOC-like, both layouts)
    local cmd=(ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy
               --section LaunchStats -k "regex:softmax_fwd|sswl_fwd|sswl_bwd" -c 16
               "$py" benchmarks/gpu/profile_ops.py)
    if [ $dry = 1 ]; then
        echo "would run: ${cmd[*]}"
        "$py" benchmarks/gpu/profile_ops.py --dry-run
    else
        "${cmd[@]}"
    fi
}
export -f profile
if [ $dry = 1 ] || command -v ncu > /dev/null; then
    step "Nsight Compute profile of the kernels" 90 ncu_profile.txt profile
else
    skip "Nsight Compute profile of the kernels" "ncu is not on PATH"
fi

bench() {  # bench NAME ARGS...: ssm-bench with JSON (and a plot, with matplotlib) into the logs
    local name=$1 plot=()
    shift
    "$py" -c "import matplotlib" 2> /dev/null && plot=(--plot "$name.png")
    cd "$logs" && "$py" -m ssm.bench "$@" --json "$name.json" "${plot[@]}" --quiet
}
export -f bench
if [ $dry = 1 ]; then
    step "GPU benchmark (dry run: tiny shape, CPU)" 120 gpu_bench.txt \
        bench gpu_bench --shape 2 3 8 8 --threads 1 --budget 0.01 --min-reps 1 --no-torch
    step "CPU thread sweep (dry run: tiny shape)" 120 cpu_sweep.txt \
        bench cpu_sweep --shape 2 3 8 8 --threads 1,2 --budget 0.01 --min-reps 1 --no-torch
else
    for w in voc ade cityscapes; do
        step "GPU benchmark, $w" 45 "gpu_$w.txt" bench "gpu_$w" --device cuda --workload "$w" \
            --budget 0.3
    done
    step "CPU thread sweep to 16 threads, voc" 90 cpu_sweep.txt \
        bench cpu_sweep --workload voc --threads 1,2,4,8,16 --budget 0.25 --min-reps 5
fi

echo >> "$summary"
echo "Total $((SECONDS - start_all)) s; $([ $failed = 0 ] && echo 'every step that ran passed' \
      || echo 'SOME STEPS FAILED: see the logs in device_check.tar.gz')." >> "$summary"
for f in gpu_tests.txt gpu_voc.txt gpu_ade.txt gpu_cityscapes.txt cpu_sweep.txt; do
    [ -f "$logs/$f" ] && { echo; echo "## $f (last lines)"; echo '```'; tail -25 "$logs/$f"; echo '```'; } \
        >> "$summary"
done
cp "$summary" "$OUT/summary.md"
tar -czf "$OUT/device_check.tar.gz" -C "$logs" .
rm -rf "$logs" "$tests_dir"
cat "$OUT/summary.md" | head -20
exit $failed
