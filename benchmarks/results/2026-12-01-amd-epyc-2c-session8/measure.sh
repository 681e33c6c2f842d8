#!/bin/bash
# Quiet measurements for session 8. Run from anywhere with nothing else running.
set -u
R=/work/main/benchmarks/results/2026-12-01-amd-epyc-2c-session8
mkdir -p $R
. /work/venv/bin/activate
cd /tmp
python -m ssm --config > $R/machine.txt 2>&1; lscpu >> $R/machine.txt; uptime >> $R/machine.txt
for w in voc ade cityscapes; do
  ssm-bench --workload $w --threads 1,2 --ops fused,loss,softmax --no-torch --no-sklearn --budget 0.6 \
    --json $R/floors_$w.json > $R/floors_$w.txt 2>&1
done
python /work/main/benchmarks/ab_builds.py --builds /work/s8base,installed \
  --cases fused:1,fused:2,loss:1,loss:2,forward:1,fused_nhwc:1,softmax:1,fused_bf16:1,fused_bf16:2,fused_f16:1,loss_bf16:1 \
  --rounds 5 > $R/ab_vs_c37f79b.txt 2>&1
python /work/main/benchmarks/out_alignment.py --threads 1,2 --reps 21 > $R/out_alignment.txt 2>&1
python /work/main/benchmarks/half_speed.py --rounds 3 --threads 1,2 > $R/half_vs_float32.txt 2>&1
uptime >> $R/machine.txt
echo done
