#!/usr/bin/env bash
# The decisive comparison of the kernel-speed work (issue #16 items 2-3), for a quiet
# machine: this tree against a base revision, and this tree's x-floor columns.
#   1. instructions per element under callgrind (repeatable under load; valgrind has no
#      AVX-512, so this is the AVX2 clone): fused, loss alone, softmax, forward; NCHW
#      and NHWC; C = 21 (VOC) and C = 150 (ADE, NCHW);
#   2. A/B timings in alternating processes (benchmarks/ab_builds.py), 1 and 2 threads;
#   3. ssm.bench on the three workloads, 1 and 2 threads: the "x floor" columns;
#   4. with FORCE_V3=1, the same A/B for builds forced to the AVX2 clone
#      (SSM_CFLAGS=-DSSM_FORCE_CLONE=x86-64-v3), for the AVX2 goal on an AVX-512 machine.
# Usage: benchmarks/floor_check.sh [BASE_REV]   (default 5661cf8; builds in $WORK)
#        PYTHON=..., ROUNDS=9, FORCE_V3=1, SKIP_CALLGRIND=1, SKIP_BENCH=1
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
base_rev=${1:-5661cf8}
py=${PYTHON:-/work/venv/bin/python}
rounds=${ROUNDS:-9}
work=${WORK:-$(mktemp -d /tmp/floor_check.XXXX)}
echo "== trees in $work (base $base_rev, this tree $(git rev-parse --short HEAD))"

build() {  # build DIR SOURCE CFLAGS: SOURCE a git revision or "here"
    rm -rf "$1" && mkdir -p "$1"
    if [ "$2" = here ]; then
        tar -c --exclude=build --exclude='*.so' --exclude=ssm/_cpu.c setup.py ssm benchmarks | tar -x -C "$1"
    else
        git archive "$2" setup.py ssm benchmarks | tar -x -C "$1"
        cp benchmarks/callgrind_ops.py "$1/benchmarks/"
    fi
    (cd "$1" && SSM_CFLAGS="$3" PYTHONPATH="$1" "$py" setup.py -q build_ext --inplace > build.log 2>&1)
}
build "$work/base" "$base_rev" ""
build "$work/new" here ""

if [ -z "${SKIP_CALLGRIND:-}" ]; then
    echo "== callgrind: instructions per element of the tile functions (AVX2 clone)"
    for tree in base new; do
        for case in "fused nchw 21" "fused nhwc 21" "loss nchw 21" "loss nhwc 21" \
                    "softmax nchw 21" "softmax nhwc 21" "forward nchw 21" \
                    "fused nchw 150" "loss nchw 150"; do
            set -- $case
            out="$work/cg.$tree.$1.$2.$3"
            (cd "$work/$tree" && PYTHONPATH="$work/$tree" valgrind --tool=callgrind \
                --callgrind-out-file="$out" --toggle-collect='ssm_*_tile_*' \
                "$py" benchmarks/callgrind_ops.py "$1" "$2" "$3" > /dev/null 2>&1)
            ir=$(callgrind_annotate "$out" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
            printf '%-5s %-8s %-5s C=%-4s %6.2f\n' "$tree" "$1" "$2" "$3" \
                "$("$py" -c "print($ir / (65536 * $3))")"
        done
    done
fi

echo "== A/B, alternating processes, medians of $rounds rounds (VOC-like)"
"$py" benchmarks/ab_builds.py --builds "$work/base,$work/new" --rounds "$rounds" \
    --cases fused:1,loss:1,softmax:1,forward:1,fused_nhwc:1,fused:2,loss:2,softmax:2
if [ -n "${FORCE_V3:-}" ]; then
    build "$work/new_v3" here "-DSSM_FORCE_CLONE=x86-64-v3"
    echo "== AVX2 clone only (new_v3) vs this tree's AVX-512 clone (new)"
    "$py" benchmarks/ab_builds.py --builds "$work/new,$work/new_v3" --rounds "$rounds" \
        --cases fused:1,loss:1,softmax:1,fused:2,loss:2,softmax:2
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    for w in voc ade cityscapes; do
        echo "== ssm.bench --workload $w (this tree): x floor"
        (cd "$work/new" && PYTHONPATH="$work/new" "$py" -m ssm.bench --workload "$w" \
            --threads 1,2 --ops fused,loss,softmax --no-torch --no-sklearn --budget 1.0)
    done
fi
