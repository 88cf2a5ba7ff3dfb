#!/usr/bin/env bash
# Data-parallel scaling on a multi-GPU machine (issue 10): predict and QLoRA training (configs/seed.yaml,
# bs 8 per GPU, no accumulation, 16 optimiser steps, no validation) on 1 GPU, then on all visible GPUs.
#   bash bench/gpu_multi.sh            # on the GPU box, after installing the wheels (see BENCHMARKS.md)
# Writes $OUT/p1, $OUT/pN (submission, probs, multi.json) and prints the scaling efficiency.
set -euo pipefail
OUT=${OUT:-bench_out}
N=$(nvidia-smi -L | wc -l)
mkdir -p "$OUT"
python -c "from mcvqa.tiny import build_random_8b; build_random_8b('/tmp/q8b')" >/dev/null 2>&1 &
build=$!
[ -f /tmp/multi/test.csv ] || python -c "
from pathlib import Path
from mcvqa.synth import SynthConfig, synthesize
synthesize(Path('/tmp/multi'), SynthConfig(train=640, test=1536, size=(720, 540), option_order='random'))"
wait "$build"
python bench/gpu_multi.py --out "$OUT/p1" 2>&1 | grep -E '^\{|Error'
python -m accelerate.commands.launch --multi_gpu --num_processes "$N" --num_machines 1 --mixed_precision no --dynamo_backend no bench/gpu_multi.py --out "$OUT/p$N" 2>&1 | grep -E '^\{|Error'
cmp "$OUT/p1/submission.csv" "$OUT/p$N/submission.csv" && echo "submissions identical"
python - "$OUT/p1/multi.json" "$OUT/p$N/multi.json" <<'PY'
import json, sys
one, many = (json.load(open(p)) for p in sys.argv[1:])
print(f"scaling efficiency on {many['world']} GPUs: {many['q_per_s'] / (many['world'] * one['q_per_s']):.1%} "
      f"({one['q_per_s']:.1f} -> {many['q_per_s']:.1f} q/s)")
PY

train() {  # $1: output folder; the rest: launcher prefix
  local out=$1; shift
  "$@" -m mcvqa train --config configs/seed.yaml --model /tmp/q8b --data /tmp/multi/train.csv --out "$out" -q \
    --set train.grad_accum=1 --set train.max_steps=16 --set train.eval_every=never >"$out.log" 2>&1 \
    || { tail -n 30 "$out.log"; exit 1; }
}
train "$OUT/t1" python
train "$OUT/t$N" python -m accelerate.commands.launch --multi_gpu --num_processes "$N" --num_machines 1 --mixed_precision no --dynamo_backend no
python - "$OUT/t1/metrics.json" "$OUT/t$N/metrics.json" "$N" <<'PY'
import json, sys
one, many = (json.load(open(p))["samples_per_second"] for p in sys.argv[1:3])
n = int(sys.argv[3])
print(f"training scaling efficiency on {n} GPUs: {many / (n * one):.1%} ({one:.2f} -> {many:.2f} samples/s, "
      "whole loop incl. its first steps)")
PY
