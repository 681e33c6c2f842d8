#!/bin/bash
# usage: ab_processes.sh OP WORKLOAD THREADS CALLS ROUNDS: the installed ssm (base) and the
# build in $NEW (default /work/wt-stage) in alternating processes; calls.py prints the median.
# alternate base (installed /work/main) and new (${NEW:-/work/wt-stage})
D=$(cd "$(dirname "$0")" && pwd)
op=$1; wl=$2; thr=$3; reps=$4; rounds=$5
for r in $(seq $rounds); do
  printf "base "; (cd /tmp && OPENBLAS_NUM_THREADS=1 /work/venv/bin/python $D/calls.py $op $wl $thr $reps)
  printf "new  "; (cd /tmp && OPENBLAS_NUM_THREADS=1 PYTHONPATH=${NEW:-/work/wt-stage} /work/venv/bin/python $D/calls.py $op $wl $thr $reps)
done
