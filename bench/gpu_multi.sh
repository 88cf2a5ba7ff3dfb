#!/usr/bin/env bash
# Data-parallel scaling on a multi-GPU machine (issue 10): predict and QLoRA training (configs/seed.yaml,
# bs 8 per GPU, no accumulation, 24 optimiser steps, no validation) on 1 GPU, then on all visible GPUs.
#   bash bench/gpu_multi.sh            # on the GPU box, after installing the wheels (see BENCHMARKS.md)
# Writes $OUT/p1, $OUT/pN (submission, probs, multi.json), $OUT/t1, $OUT/tN (metrics.json) and a log per
# phase, and prints the scaling efficiencies. A failed phase prints its log tail and the script goes on.
set -uo pipefail
OUT=${OUT:-bench_out}
N=$(nvidia-smi -L | wc -l)
STEPS=${STEPS:-24}
PHASES=${PHASES:-predict train}  # PHASES=train bash bench/gpu_multi.sh: training only
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
LAUNCH=(python -m accelerate.commands.launch --multi_gpu --num_processes "$N" --num_machines 1 --mixed_precision no --dynamo_backend no)

[ -d /tmp/q8b ] || python bench/random_8b.py /tmp/q8b >"$OUT/build.log" 2>&1 &
build=$!
[ -f /tmp/multi/test.csv ] || python -c "
from pathlib import Path
from mcvqa.synth import SynthConfig, synthesize
synthesize(Path('/tmp/multi'), SynthConfig(train=640, test=3840, size=(720, 540), option_order='random'))" >"$OUT/synth.log" 2>&1
wait "$build" || { tail -n 20 "$OUT/build.log"; exit 1; }
stamp "model and data ready on $N GPUs"

phase() {  # $1: name (log file); the rest: the command
  local name=$1; shift
  if "$@" >"$OUT/$name.log" 2>&1; then stamp "$name done"; grep -E '^\{' "$OUT/$name.log" || true
  else stamp "$name FAILED"; tail -n 25 "$OUT/$name.log"; fi
}
if [[ $PHASES == *predict* ]]; then
phase p1 python bench/gpu_multi.py --out "$OUT/p1"
phase "p$N" "${LAUNCH[@]}" bench/gpu_multi.py --out "$OUT/p$N"
cmp -s "$OUT/p1/submission.csv" "$OUT/p$N/submission.csv" && echo "submissions identical" || echo "submissions DIFFER"
python - "$OUT/p1/multi.json" "$OUT/p$N/multi.json" <<'PY' || true
import json, sys
one, many = (json.load(open(p)) for p in sys.argv[1:])
print(f"predict scaling efficiency on {many['world']} GPUs: {many['q_per_s'] / (many['world'] * one['q_per_s']):.1%} "
      f"({one['q_per_s']:.1f} -> {many['q_per_s']:.1f} q/s)")
PY

fi

TRAIN=(-m mcvqa train --config configs/seed.yaml --model /tmp/q8b --data /tmp/multi/train.csv -q
       --set train.grad_accum=1 --set "train.max_steps=$STEPS" --set train.eval_every=never --set train.report_to=[])
if [[ $PHASES == *train* ]]; then
phase t1 python "${TRAIN[@]}" --out "$OUT/t1"
phase "t$N" "${LAUNCH[@]}" "${TRAIN[@]}" --out "$OUT/t$N"
python - "$OUT/t1/metrics.json" "$OUT/t$N/metrics.json" "$N" <<'PY' || true
import json, sys
one, many = (json.load(open(p)) for p in sys.argv[1:3])
n = int(sys.argv[3])
for key, what in (("samples_per_second", "whole loop"), ("steady_samples_per_second", "after the first 3 steps")):
    a, b = one.get(key), many.get(key)
    if a and b:
        print(f"training scaling efficiency on {n} GPUs, {what}: {b / (n * a):.1%} ({a:.2f} -> {b:.2f} samples/s)")
print(f"{one['steps']} vs {many['steps']} steps in {one['seconds']} vs {many['seconds']} s")
PY
fi
rm -rf "$OUT"/t*/checkpoint* "$OUT"/t*/last "$OUT"/t*/best  # adapters of random weights: not worth carrying back
stamp "all done"
