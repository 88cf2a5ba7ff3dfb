#!/usr/bin/env bash
# Issue 26's GPU runs, one device call per argument, most important first; every script writes its JSON as it goes,
# so a call cut by its time limit still brings back the rows it finished. Run from the repository root through the
# device tool (no package index there, hence the wheel folders; see BENCHMARKS.md for how each folder is filled):
#
#   bash bench/issue26.sh predict    # carry .whl .fixtures      start-up probe; e2e bf16 (+ reference loop), nf4 (+ orders), nf4 packed
#   bash bench/issue26.sh headline   # carry .whl .fixtures      predict's rows and the merged adapter's in one call (~520 s; no cold probe, no packed row)
#   bash bench/issue26.sh goals      # carry .whl .fixtures      predict's goal rows with their anchors, and bf16 with the loader started late (~540 s)
#   bash bench/issue26.sh train      # carry .whl-u .fixtures    stack.py: mcvqa vs Unsloth vs plain peft; + the dense-mask step, + peft's LoRA forward; the recipe profiled
#   bash bench/issue26.sh trainpaired # carry .whl-u .fixtures   mcvqa, Unsloth, peft's LoRA forward, mcvqa again: one call, step times (410 s with a cold start)
#   bash bench/issue26.sh families   # carry .whl-f .fixtures    families.py with Liger and flash-linear-attention
#   bash bench/issue26.sh families2  # carry .whl .fixtures      the same for InternVL and LLaVA-OneVision
#   bash bench/issue26.sh trainprofile # carry .whl .fixtures  the training step packed vs rows, each profiled (attention's share)
#   bash bench/issue26.sh trainunsloth # carry .whl-u .fixtures  mcvqa train on the Unsloth backend and on peft's, each profiled
#   bash bench/issue26.sh traincli   # carry .whl .fixtures      mcvqa train's own loop profiled, packed vs rows
#   bash bench/issue26.sh adapter    # carry .whl .fixtures      predict --adapter (nf4), the adapter merged and not
#   bash bench/issue26.sh coldload   # carry .whl .fixtures      the 8B's load from a cold page cache, model.read_ahead on and off
#   bash bench/issue26.sh fp8cold    # carry .whl .fixtures      predict --quant fp8, then coldload's loads on the same build
#   bash bench/issue26.sh ab         # carry .whl .fixtures      prefix rows kept vs concatenated (bf16); the fast exit vs the teardown (nf4)
#   bash bench/issue26.sh firstbatch # carry .whl .fixtures      predict's first batches timed (host marks, CUDA events, cProfile), bf16 and nf4
#   bash bench/issue26.sh orders     # carry .whl .fixtures      --tta orders (nf4) with the prefix rows and without, in one call (~300 s)
#   bash bench/issue26.sh fp8        # carry .whl .fixtures      the CLI's loop profiled in bf16 and fp8; fp8 with the prefix rows and without (~400 s)
#   bash bench/issue26.sh profile    # carry .whl .fixtures      levers.py (eager vs Liger, stages, kernels), the
#                                                                CLI's own loop under the profiler (profile_cli.py), fp8
#
# Wheel folders: .whl = ../shared/tools/device-wheels.sh peft==0.21.2 liger-kernel==0.8.5; .whl-f = the same plus
# fla-core==0.6.0 flash-linear-attention==0.6.0 einops; .whl-u = the Unsloth list of BENCHMARKS.md's issue-25 section
# without its transformers wheel (each under 64 MiB with .fixtures). .fixtures holds qwen3-vl-8b-instruct (all calls)
# and families.tar.xz (families only: copy it from ../shared/fixtures, and leave it out of the other calls). `train` runs on the
# machine's own transformers: the Unsloth release accepts no newer one, and both backends must run on the same.
set -euo pipefail
what=${1:?predict, headline, train, trainpaired, trainunsloth, families, families2, trainprofile, traincli, adapter, coldload, fp8cold, fp8, ab, firstbatch, goals, orders or profile}
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
install() {
    rm -rf /tmp/site  # a warm machine keeps the last call's wheels there: run on this call's set only
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
case "$what" in
predict)
    install .whl
    # The start-up's parts on this machine, in a fresh process: first with the wheels' bytecode not yet compiled, then as
    # every later run (and a user's installed environment) finds them.
    python bench/startup.py --out "$OUT" --json startup_cold.json || true
    python bench/startup.py --out "$OUT" --json startup.json || true
    python bench/e2e.py --out "$OUT" --quants none --phases predict,reference --json e2e_bf16.json
    python bench/e2e.py --out "$OUT" --quants nf4,nf4:packed --phases predict,orders --json e2e_nf4.json
    ;;
goals)
    install .whl
    # Every predict goal of the issue with its anchors in one call (bf16 + the reference loop, nf4 whole + orders), and
    # bf16 again with the loader's workers started after the weights (predict.early_loader=false): the lever the
    # thirteenth session made the default, against its absence on the same machine.
    python bench/startup.py --out "$OUT" --json startup.json || true
    python bench/e2e.py --out "$OUT" --quants none,none:lateloader --phases predict,reference --json e2e_bf16.json
    python bench/e2e.py --out "$OUT" --quants nf4 --phases predict,orders --json e2e_nf4.json
    ;;
headline)
    install .whl
    # predict's figures and the merged adapter's in one call (the packed-4-bit row, the cold start-up and the unmerged
    # adapter left out: with all of them a slow host ran past the 600 s limit; `adapter` runs the unmerged row)
    python bench/startup.py --out "$OUT" --json startup.json || true
    python bench/e2e.py --out "$OUT" --quants none --phases predict,reference --json e2e_bf16.json
    python bench/e2e.py --out "$OUT" --quants nf4 --phases predict,orders --json e2e_nf4.json
    python bench/e2e.py --out "$OUT" --quants nf4:adapter --phases predict --json e2e_adapter.json
    ;;
train)
    install .whl-u
    HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python bench/stack.py --out "$OUT" --phases train,packed,nofuse --json stack_train.json
    # The recipe's own loop under the profiler (4 optimiser steps after 8): where a step's time goes now.
    python bench/profile_cli.py --out "$OUT" --command train --skip 8 --active 4 || true
    ;;
families)
    install .whl-f
    mkdir -p /tmp/fam && tar -xJf .fixtures/families.tar.xz -C /tmp/fam
    python bench/families.py --families /tmp/fam/families --which Qwen3.5-9B,gemma-4-E4B-it \
        --n-test 400 --n-small 100 --n-plain 128 --n-train 128 --peft-steps 4 --json families_qwen35_gemma4.json
    ;;
families2)
    install .whl
    mkdir -p /tmp/fam && tar -xJf .fixtures/families.tar.xz -C /tmp/fam
    python bench/families.py --families /tmp/fam/families --which InternVL3_5-8B-HF,llava-onevision-qwen2-7b-ov-hf \
        --n-test 400 --n-small 100 --n-plain 128 --n-train 128 --peft-steps 4 --json families_internvl_llava.json
    ;;
adapter)
    install .whl
    # The command a user runs after training: nf4 with a LoRA adapter of the recipe's shape, merged (the default) and not.
    python bench/e2e.py --out "$OUT" --quants nf4:adapter,nf4:adapter_unmerged --phases predict --json e2e_adapter.json
    ;;
fp8cold)
    install .whl
    # The opt-in FP8 row, then the cold loads of `coldload` on the same build (a warm machine keeps the last call's
    # /tmp/q8b_real; the fp8 row runs first, as the cold loads drop the files from the page cache).
    python bench/e2e.py --out "$OUT" --quants fp8 --phases predict --json e2e_fp8.json
    python bench/cold_load.py --model /tmp/q8b_real --device cuda --dtype bf16 --repeats 2 --out "$OUT" --json cold_load_bf16.json
    ;;
ab)
    install .whl
    # The eleventh session's two levers against their absence, each pair in one process sequence: the prefix kept
    # laid out per row (bf16, the in-run rate) and the process's end without the interpreter's teardown (nf4, the
    # wall after the scoring). ~400 s with the build.
    python bench/e2e.py --out "$OUT" --quants none,none:rowsoff --phases predict --json e2e_rows_ab.json
    python bench/e2e.py --out "$OUT" --quants nf4,nf4:teardown --phases predict --json e2e_exit_ab.json
    ;;
orders)
    install .whl
    # --tta orders cost 1.30x plain in the twelfth session against 1.15x in the eleventh, its in-run rate 49 against 64
    # q/s, the first measurement with the prefix rows on (its masked attention keeps them too): both ways, one call.
    python bench/e2e.py --out "$OUT" --quants nf4,nf4:rowsoff --phases orders --json e2e_orders.json
    ;;
firstbatch)
    install .whl
    # The ~2.4 s between the load and the first result: the loader's start, the GPU's work, the host's warm-ups. Each
    # quantisation in a fresh process (as a user's command), the second one finding Triton's cache warm.
    for quant in none nf4; do python bench/first_batch.py --out "$OUT" --quant $quant; done
    ;;
coldload)
    install .whl
    # The whole 8B (17 GB of bf16) loaded onto the GPU in fresh processes, each after its files were dropped from the
    # page cache, with the weights read ahead while the processor loads and without (alternated, 2 each: the build and
    # four cold loads of 17 GB fit the call's 600 s).
    python bench/random_8b.py /tmp/q8b --like .fixtures/qwen3-vl-8b-instruct
    python bench/cold_load.py --model /tmp/q8b --device cuda --dtype bf16 --repeats 2 --out "$OUT" --json cold_load_bf16.json
    ;;
trainpaired)
    install .whl-u
    # The recipe on both backends and with peft's LoRA forward, and the recipe again: how far one setting moves within
    # a call; each row's step times pair with the others' step by step (the same batches).
    HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python bench/stack.py --out "$OUT" --runs "/tmp/stack_runs_$$" --phases none \
        --variant fused= --variant unsloth=model.backend=unsloth --variant nofuse=lora.fused=false --variant fused= --json stack_paired.json
    ;;
trainunsloth)
    install .whl-u
    # mcvqa's loop on the Unsloth backend and on peft's, each under the profiler (4 optimiser steps after 8): why the
    # Unsloth backend's steady rate led peft's in the eighth session's call 1.
    for backend in unsloth peft; do
        HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python bench/profile_cli.py --out "$OUT" --command train \
            --set model.backend=$backend --tag train_$backend --skip 8 --active 4 || true
    done
    ;;
traincli)
    install .whl
    # The CLI's own training loop under the profiler (4 optimiser steps after 8), the recipe's packed step and the
    # row-by-row one: the step's CPU and GPU time as a user's run spends it.
    for mode in packed rows; do
        python bench/profile_cli.py --out "$OUT" --command train --shared-prefix $mode --skip 8 --active 4 || true
    done
    ;;
trainprofile)
    install .whl
    python bench/levers.py --out "$OUT" --phases train --train-variants liger:16,liger:16:rows \
        --profile-train liger:16,liger:16:rows --json levers_train.json
    ;;
fp8)
    install .whl
    # Why --quant fp8 ran slower than bf16 on the H200 (87 against 102 q/s; 10% faster on the H100s): the CLI's own
    # loop profiled in bf16 and in fp8 (kernel tables side by side), then fp8 with the prefix rows and without (its
    # first run with them on was that H200 call).
    python bench/profile_cli.py --out "$OUT" --quant none --n 1000 || true
    python bench/profile_cli.py --out "$OUT" --quant fp8 --n 1000 || true
    python bench/e2e.py --out "$OUT" --quants fp8,fp8:rowsoff --phases predict --json e2e_fp8.json
    ;;
profile)
    install .whl
    python bench/levers.py --out "$OUT" --phases predict --n 256 --batch-sizes 16 \
        --variants eager,liger,liger+syncmerge,nf4+liger --profile-variant liger,nf4+liger --json levers.json
    python bench/profile_cli.py --out "$OUT" --quant none --n 1000 --stack
    python bench/check_kernels.py --out "$OUT"
    python bench/e2e.py --out "$OUT" --quants fp8 --phases predict --json e2e_fp8.json
    ;;
*)
    echo "unknown: $what (predict, headline, train, trainpaired, trainunsloth, families, families2, trainprofile, traincli, adapter, coldload, fp8cold, fp8, ab, firstbatch, goals, orders or profile)" >&2
    exit 2
    ;;
esac
