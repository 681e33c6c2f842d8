#!/bin/bash
# Quiet measurements for session 9, on an AVX2-only CPU (AMD EPYC, family 25 model 1:
# Zen 3). Run with nothing else running.
set -u
R=$(cd "$(dirname "$0")" && pwd)
B=$(cd "$R/../.." && pwd)
. /work/venv/bin/activate
cd /tmp
python -m ssm --config > $R/machine.txt 2>&1; lscpu >> $R/machine.txt; uptime >> $R/machine.txt
for w in voc ade cityscapes; do
  ssm-bench --workload $w --threads 1,2 --ops fused,loss,softmax,forward --no-torch --no-sklearn --budget 0.6 \
    --json $R/floors_$w.json > $R/floors_$w.txt 2>&1
done
ssm-bench --workload voc --threads 2 --ops fused,loss --no-sklearn --budget 0.6 > $R/vs_torch_voc.txt 2>&1
python $B/row_stride.py --threads 1,2 --reps 15 > $R/row_stride.txt 2>&1
python $B/out_alignment.py --threads 1,2 --reps 21 > $R/out_alignment.txt 2>&1
python $B/half_speed.py --rounds 3 --threads 1,2 > $R/half_vs_float32.txt 2>&1
uptime >> $R/machine.txt
echo done
