#!/bin/bash
# usage: abpos.sh ROUNDS name=path ... : positions float32 pose, 1 thread, alternating processes
rounds=$1; shift
builds=("$@")
cd /tmp
for r in $(seq $rounds); do
  n=${#builds[@]}; off=$((r % n))
  for i in $(seq 0 $((n-1))); do
    b=${builds[$(((i + off) % n))]}; name=${b%%=*}; P=${b#*=}
    for op in soft_argmax soft_argmax_grad; do
      v=$(PYTHONPATH=$P /work/venv/bin/python /work/main/benchmarks/half_speed.py --calls 15 --one pose $op 1 float32 | tail -1)
      echo "$name $op $v"
    done
  done
done
