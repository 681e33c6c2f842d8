#!/bin/bash
# Quiet measurements for session 7. Run from /work/main with nothing else running.
set -u
R=/work/main/benchmarks/results/2026-12-01-amd-epyc-2c-session7
mkdir -p $R
. /work/venv/bin/activate
cd /tmp
python -m ssm --config > $R/machine.txt 2>&1; lscpu >> $R/machine.txt; uptime >> $R/machine.txt
for w in voc ade cityscapes; do
  ssm-bench --workload $w --threads 1,2 --ops fused,loss,softmax --no-torch --no-sklearn --budget 0.6 \
    --json $R/floors_$w.json > $R/floors_$w.txt 2>&1
done
python /work/main/benchmarks/half_speed.py --rounds 3 --threads 1,2 > $R/half_vs_float32.txt 2>&1
python /work/main/benchmarks/ab_builds.py --builds /work/s7base,installed \
  --cases fused:1,fused:2,loss:1,loss:2,softmax:1,forward:1,fused_nhwc:1,log_softmax:1 --rounds 5 > $R/ab_vs_0ec92df.txt 2>&1
ssm-bench --dask --workload voc --threads 2 --dask-chunk 1 > $R/dask_voc_x4_chunk1.txt 2>&1
ssm-bench --dask --workload voc --threads 2 --dask-chunk 8 > $R/dask_voc_x4_chunk8.txt 2>&1
ssm-bench --dask --workload voc --threads 2 --dask-scale 16 --dask-chunk 16 > $R/dask_voc_x16_chunk16.txt 2>&1
ssm-bench --dask --workload voc --threads 2 --dask-scale 32 --dask-chunk 32 > $R/dask_voc_x32_chunk32.txt 2>&1
# pertask.py: dask_task_in_worker.py in this folder
(cd /tmp/dk && for i in 1 2 3; do python pertask.py 2>&1 | grep -v -i 'warn\|perhaps\|hosting'; done) > $R/dask_task_in_worker.txt
uptime >> $R/machine.txt
echo done
