#!/bin/bash
# Session 12's measurements (run from anywhere; writes beside this script). Nothing else
# ran meanwhile. two_classes.txt is from its own command (README).
set -e
D=$(cd "$(dirname "$0")" && pwd)
R=$(cd "$D/../../.." && pwd)
cd /tmp
py=${PYTHON:-python}
$py -c "import ssm; ssm.show_config()" > "$D/machine.txt" 2>&1
for w in voc ade cityscapes; do
  $py -m ssm.bench --workload $w --threads 1,2 --ops fused,loss --no-torch --no-sklearn \
      --budget 0.6 --quiet --json "$D/floors_$w.json" > "$D/floors_$w.txt" 2>&1
done
$py "$R/benchmarks/half_speed.py" --shapes voc,ade --ops fused,loss \
    --rounds 3 --threads 1,2 > "$D/half_vs_float32.txt" 2>&1
