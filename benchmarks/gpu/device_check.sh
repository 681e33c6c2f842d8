#!/usr/bin/env bash
# One command for the day a GPU is lent: everything the GPU path needs verified, in one call.
#
# On a machine with an NVIDIA GPU, CuPy, nvcc, compute-sanitizer and 16 cores, and no
# network (the build needs Cython, setuptools and NumPy installed), from the repository root:
#     OUT=/some/folder benchmarks/gpu/device_check.sh
# it builds ssm from this tree (in place; nothing is installed), then
#   1. the GPU tests (tests/test_gpu.py on the device, and the nvcc/NVRTC compile checks),
#   2. compute-sanitizer memcheck, racecheck, initcheck and synccheck over a subset of them,
#   3. the GPU benchmark (python -m ssm.bench --device cuda: a device-to-device copy of the
#      same bytes, and PyTorch where installed) on the three workloads,
#   4. the CPU thread sweep up to 16 threads on the default workload,
# and writes everything under $OUT (default ./device-check): summary.txt (one line per step:
# exit status and seconds), a log per step, and the benchmarks' JSON in one archive; at most
# 8 files. Each step has a time limit; the whole run fits in 8 minutes.
#
# --dry-run: no GPU needed; every step runs its logic against the CUDA simulator
# (ssm.testing.cudasim) on small cases, as CI does, so that one call on a device does
# the whole verification: the same script, only the device differs.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
py=${PYTHON:-python3}
out=${OUT:-$root/device-check}
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
mkdir -p "$out"
: > "$out/summary.txt"
start_all=$SECONDS
status=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=1
    printf '%-12s rc=%-3d %4d s  %s\n' "$name" "$rc" $((SECONDS - t0)) "$*" | tee -a "$out/summary.txt"
}

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ $dry -eq 1 ]; then
    marker=cudasim
    tests=(tests/test_gpu.py -k "backend or errors or mixing")
    subset=(tests/test_cudasim.py -k "not traffic and not fma and not uninitialised_reads")
    cpu_bench=("$py" -m ssm.bench --shape 2 21 64 64 --threads 1,2 --budget 0.05 --min-reps 3
               --no-torch --no-sklearn --json "$out/bench-cpu.json")
else
    marker=gpu
    tests=(tests/test_gpu.py tests/test_cuda_compile.py -n 8)  # pytest-xdist
    subset=(tests/test_gpu.py -k "backend_matches_cpu and float32 and (3-5-1 or 2-7-33)")
    cpu_bench=("$py" -m ssm.bench --threads 1,2,4,8,16 --budget 0.3 --no-sklearn
               --json "$out/bench-cpu.json")
fi

step build 180 "$py" setup.py build_ext --inplace
step tests 180 "$py" -m pytest -q -p no:cacheprovider -m "$marker" -rs "${tests[@]}"
if [ $dry -eq 1 ]; then
    # the simulator does the sanitizer's checking itself: its negative controls
    step sanitizer 120 "$py" -m pytest -q -p no:cacheprovider "${subset[@]}"
    step bench-gpu 120 "$py" -m ssm.bench --device cudasim
else
    for tool in memcheck racecheck initcheck synccheck; do
        step "san-$tool" 60 compute-sanitizer --error-exitcode 1 --print-limit 20 --tool "$tool" \
            "$py" -m pytest -q -p no:cacheprovider -m gpu "${subset[@]}"
    done
    for w in voc ade cityscapes; do
        step "bench-$w" 60 "$py" -m ssm.bench --device cuda --workload "$w" --budget 0.3 \
            --json "$out/bench-gpu-$w.json"
    done
fi
step bench-cpu 150 "${cpu_bench[@]}"

# at most 8 files come back from a lent machine: the per-step logs of a kind in one file each
merge() {  # merge DEST FILE...: FILEs (those that exist) into DEST, then removed
    local dest=$1 have=()
    shift
    for f in "$@"; do [ -e "$f" ] && have+=("$f"); done
    [ ${#have[@]} -gt 0 ] || return 0
    cat "${have[@]}" > "$dest.tmp" && rm -f "${have[@]}" && mv "$dest.tmp" "$dest"
}
( cd "$out" || exit
  merge sanitizer.log san-memcheck.log san-racecheck.log san-initcheck.log san-synccheck.log
  merge bench-gpu.log bench-voc.log bench-ade.log bench-cityscapes.log
  jsons=(bench-*.json)
  [ -e "${jsons[0]}" ] && tar czf bench-json.tar.gz "${jsons[@]}" && rm -f "${jsons[@]}"
  true )
printf 'total %d s, %s\n' $((SECONDS - start_all)) \
    "$([ $status -eq 0 ] && echo 'every step passed' || echo 'FAILED: see the logs')" \
    | tee -a "$out/summary.txt"
exit $status
