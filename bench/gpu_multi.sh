#!/usr/bin/env bash
# Data-parallel predict scaling on a multi-GPU machine (issue 10): 1 GPU, then all visible GPUs, same data.
#   bash bench/gpu_multi.sh            # on the GPU box, after installing the wheels (see BENCHMARKS.md)
# Writes $OUT/p1, $OUT/pN (submission, probs, multi.json) and prints the scaling efficiency.
set -euo pipefail
OUT=${OUT:-bench_out}
N=$(nvidia-smi -L | wc -l)
python -c "from mcvqa.tiny import build_random_8b; build_random_8b('/tmp/q8b')" >/dev/null 2>&1 &
build=$!
[ -f /tmp/multi/test.csv ] || python -c "
from pathlib import Path
from mcvqa.synth import SynthConfig, synthesize
synthesize(Path('/tmp/multi'), SynthConfig(train=0, test=1536, size=(720, 540), option_order='random'))"
wait "$build"
python bench/gpu_multi.py --out "$OUT/p1" 2>&1 | grep -E '^\{|Error'
python -m accelerate.commands.launch --multi_gpu --num_processes "$N" bench/gpu_multi.py --out "$OUT/p$N" 2>&1 | grep -E '^\{|Error'
cmp "$OUT/p1/submission.csv" "$OUT/p$N/submission.csv" && echo "submissions identical"
python - "$OUT/p1/multi.json" "$OUT/p$N/multi.json" <<'PY'
import json, sys
one, many = (json.load(open(p)) for p in sys.argv[1:])
print(f"scaling efficiency on {many['world']} GPUs: {many['q_per_s'] / (many['world'] * one['q_per_s']):.1%} "
      f"({one['q_per_s']:.1f} -> {many['q_per_s']:.1f} q/s)")
PY
