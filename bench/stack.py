"""The reference's own stack beside mcvqa (issue 25), through the CLI on one GPU, in one call.

    python bench/stack.py --out "$OUT" --phases train,fp16          # Unsloth vs mcvqa vs plain peft; fp16 forced
    python bench/stack.py --out "$OUT" --phases prequant,resume      # pre-quantised load; Unsloth resume + predict

* ``train``: ``mcvqa train --config configs/seed.yaml`` on the same 480 competition-like rows (1 epoch, bs 8 x 2,
  no validation) with ``model.backend`` peft (mcvqa's own loop) and unsloth (Unsloth's 4-bit model, patched
  layers and LoRA under mcvqa's loop), then the plain transformers + peft QLoRA loop (``gpu_bench.bench_train``'s
  ``plain``). Steady samples/s, peak memory and the loss per optimiser step (``metrics.json``).
* ``offload``: the same ``mcvqa train`` with ``train.offload_checkpoints: false``: the recipe keeps each checkpointed
  layer's input in page-locked host memory until the backward pass (Unsloth's offloaded checkpointing in mcvqa's
  loop); this row keeps them on the GPU.
* ``packed``, ``nofuse``: the same with ``train.shared_prefix: packed`` (the dense mask), with ``lora.fused: false``.
* ``rows``: the same ``mcvqa train`` with ``train.shared_prefix: rows`` (the packed rows' attention as the prefix's
  plus each row's, instead of SDPA over the dense (T, T) mask: ``kernels.PackedRows``).
* ``fp16``: the same ``mcvqa train`` with ``model.dtype: fp16`` forced (loss scaling), beside the bf16 run.
* ``prequant``: ``mcvqa quantize`` writes an nf4 checkpoint; ``mcvqa predict`` on 200 questions from it vs
  ``--quant nf4`` on the bf16 checkpoint (load seconds from ``predict_summary.json``, wall from process start,
  same probabilities expected); ``mcvqa train`` from it for a few steps.
* ``resume``: the Unsloth backend stopped after 5 steps, ``--resume`` to the end, ``predict --adapter`` on it.
* ``--variant LABEL=KEY=VALUE,...`` (repeatable, after the phases, in order): one more ``mcvqa train`` row with those
  ``--set`` values (``env:NAME=VALUE`` sets an environment variable instead). Repeat a setting to see how much one
  configuration moves within a call; ``--phases none`` runs the variants alone.

Every ``mcvqa train`` row also records each optimiser step's seconds (``metrics.json``'s ``step_seconds``: the same
batches in every row, so rows compare step by step), their median after the first four, and the process's garbage
collections (``gcprobe/sitecustomize.py``; ``env:MCVQA_BENCH_GC=nofreeze`` runs a row without
``mcvqa.runtime.frozen_heap``).

The model is the real Qwen3-VL-8B-Instruct architecture with random weights from the real config, tokenizer and
processor (``e2e.py``'s build); every phase records its error instead of stopping the call. Writes ``stack.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from e2e import add_build_arguments, cli, make_data  # noqa: E402
from gpu_bench import log, versions  # noqa: E402
from tables import median  # noqa: E402

SEED = str(HERE.parent / "configs" / "seed.yaml")
ONE_EPOCH = ["--set", "train.epochs=1", "--set", "train.eval_every=never", "--set", "train.report_to=[]", "--set", "data.val_fraction=0.01"]


def train_row(model: Path, data: Path, run: Path, label: str, extra: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    # Every row records its process's garbage collections (gcprobe/sitecustomize.py): a full one holds the host.
    gc_file = run.with_name(run.name + "_gc.json")
    path = [str(HERE / "gcprobe"), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {"PYTHONPATH": os.pathsep.join(path), "MCVQA_BENCH_GC_OUT": str(gc_file), **(env or {})}
    try:
        wall, _ = cli(["train", "--config", SEED, "--model", str(model), "--data", str(data / "train.csv"), "--out", str(run), "-q", *ONE_EPOCH, *extra], env)
    except RuntimeError as e:
        row = {"path": label, "error": str(e)[-2500:]}
        log(row)
        return row
    m = json.loads((run / "metrics.json").read_text())
    row = {"path": label, "seconds": round(wall, 1), "steps": m["steps"], "samples_per_s": m.get("samples_per_second"),
           "steady_samples_per_s": m.get("steady_samples_per_second"), "peak_gib": m.get("peak_gpu_gib"),
           "losses": [round(l, 4) for _, l in m.get("losses", [])], "step_seconds": m.get("step_seconds"),
           # The lent machine has slow stretches of many steps (seen once: a run's steps at 0.84-1.13 s for a while, then
           # at 0.74 s again, as the same setting's whole run before it): the median step after the first four is the
           # figure such a stretch moves least.
           "median_step_seconds": median(m.get("step_seconds", [])[4:]),
           "gc": json.loads(gc_file.read_text()) if gc_file.exists() else None}
    log({k: v for k, v in row.items() if k not in ("losses", "step_seconds")}, "losses", row["losses"][:3], "...", row["losses"][-3:])
    return row


def plain_peft_row(model: Path, data: Path, steps: int) -> dict[str, Any]:
    from gpu_bench import bench_prompt, bench_train

    from mcvqa.config import load_config
    from mcvqa.data import read_csv
    from mcvqa.model import load_processor

    cfg = load_config(None, [f"model.name_or_path={model}", "model.quant=nf4", "image.mode=letterbox", "image.size=512"], env=False)
    prompt = bench_prompt(load_processor(str(model)).tokenizer, 883)
    ns = argparse.Namespace(train_runs=[("plain", 8)], train_steps=steps, profile=0)
    row = bench_train(cfg, prompt, read_csv(data / "train.csv").items, ns, "nf4")[0]
    row["path"] = "plain transformers + peft QLoRA loop, bs 8, 883-token prompt"
    log(row)
    return row


def predict_row(args: list[str], run: Path, label: str) -> dict[str, Any]:
    try:
        wall, tail = cli(["predict", *args, "--out", str(run), "-q"])
    except RuntimeError as e:
        return {"path": label, "error": str(e)[-2500:]}
    s = json.loads((run / "predict_summary.json").read_text())
    row = {"path": label, "seconds": round(wall, 1), "load_seconds": s.get("load_seconds"), "questions": s.get("questions"), "stderr_tail": tail[-300:]}
    log(row)
    return row


def prequant_rows(model: Path, data: Path, runs: Path) -> list[dict[str, Any]]:
    rows = []
    q = runs / "q8b_nf4"
    t = time.perf_counter()
    try:
        cli(["quantize", "--model", str(model), "--quant", "nf4", "--out", str(q)])
        rows.append({"path": "mcvqa quantize --quant nf4 (load + quantise + save)", "seconds": round(time.perf_counter() - t, 1),
                     "gib_on_disk": round(sum(f.stat().st_size for f in q.glob("*.safetensors")) / 2**30, 2)})
    except RuntimeError as e:
        rows.append({"path": "mcvqa quantize", "error": str(e)[-2500:]})
        return rows
    log(rows[-1])
    test = str(data / "test_200.csv")
    a = predict_row(["--model", str(q), "--data", test], runs / "p_prequant", "predict --model <pre-quantised nf4>, 200 q")
    b = predict_row(["--model", str(model), "--quant", "nf4", "--data", test], runs / "p_atload", "predict --model <bf16> --quant nf4 (quantise at load), 200 q")
    c = predict_row(["--model", str(q), "--quant", "nf4", "--data", test], runs / "p_prequant_flag", "predict --model <pre-quantised> --quant nf4, 200 q")
    rows += [a, b, c]
    if "error" not in a and "error" not in b:
        import numpy as np
        import pandas as pd

        pa = pd.read_csv(runs / "p_prequant" / "probs.csv")[["p_a", "p_b", "p_c", "p_d"]].to_numpy()
        pb = pd.read_csv(runs / "p_atload" / "probs.csv")[["p_a", "p_b", "p_c", "p_d"]].to_numpy()
        rows.append({"path": "pre-quantised vs quantise-at-load probabilities", "max_abs_diff": float(np.abs(pa - pb).max()),
                     "argmax_agreement": float((pa.argmax(1) == pb.argmax(1)).mean())})
        log(rows[-1])
    rows.append(train_row(q, data, runs / "t_prequant", "mcvqa train --model <pre-quantised nf4>, 6 steps", ["--set", "train.max_steps=6"]))
    return rows


def resume_rows(model: Path, data: Path, runs: Path) -> list[dict[str, Any]]:
    run = runs / "t_unsloth_resume"
    sets = ["--set", "model.backend=unsloth", "--set", "train.max_steps=10"]
    rows: list[dict[str, Any]] = []
    try:
        cli(["train", "--config", SEED, "--model", str(model), "--data", str(data / "train.csv"), "--out", str(run), "-q", *ONE_EPOCH, *sets, "--set", "train.stop_after_steps=5"])
        rows = [{"path": "unsloth backend: first invocation stopped after 5 of 10 steps", "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir())}]
        wall, _ = cli(["train", "--config", SEED, "--model", str(model), "--data", str(data / "train.csv"), "--out", str(run), "-q", "--resume", *ONE_EPOCH, *sets])
        m = json.loads((run / "metrics.json").read_text())
        rows.append({"path": "unsloth backend: --resume to the end", "seconds": round(wall, 1), "steps": m["steps"], "losses": [round(l, 4) for _, l in m["losses"]]})
    except RuntimeError as e:
        rows.append({"path": "unsloth backend resume", "error": str(e)[-2500:]})
        return rows
    log(rows)
    rows.append(predict_row(["--adapter", str(run / "best"), "--data", str(data / "test_200.csv")], runs / "p_unsloth_adapter", "predict --adapter <unsloth run>/best, 200 q"))
    return rows


def parse_variant(spec: str) -> tuple[str, str, list[str], dict[str, str]]:
    """``LABEL=KEY=VALUE,...`` -> (label, the settings as given, the CLI's --set arguments, environment variables)."""
    label, _, sets = spec.partition("=")
    items = [x for x in sets.split(",") if x]  # a value with a comma in it (a list) is not supported here
    if not label.replace("_", "").replace("-", "").isalnum() or any("=" not in x for x in items):
        raise SystemExit(f"--variant {spec!r}: want LABEL=KEY=VALUE,... (LABEL: letters, digits, - and _; env:NAME=VALUE sets a variable)")
    env = dict(x[4:].split("=", 1) for x in items if x.startswith("env:"))
    return label, sets, [a for x in items if not x.startswith("env:") for a in ("--set", x)], env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(ap)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/stack_runs"))
    ap.add_argument("--phases", default="train,fp16")
    ap.add_argument("--backends", default="peft,unsloth")
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--n-train", type=int, default=480)
    ap.add_argument("--plain-steps", type=int, default=8)
    ap.add_argument("--json", default="stack.json")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=KEY=VALUE,...",
                    help="an mcvqa train row with these --set values (env:NAME=VALUE sets an environment variable instead), "
                         "after the phases, in the order given; repeat a label to run it twice in one call")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]  # a typo stops the call before any GPU time is spent
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    try:
        import unsloth  # noqa: F401  (here only to record its version; the CLI runs import it themselves)

        info["unsloth"] = unsloth.__version__
    except Exception as e:  # noqa: BLE001 - recorded, the other phases still run
        info["unsloth"] = f"import failed: {type(e).__name__}: {str(e)[:300]}"
    log(info)
    results: list[dict[str, Any]] = []
    save = lambda: (args.out / args.json).write_text(json.dumps({"versions": info, "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    if not (args.build / "config.json").exists():
        from random_8b import build_random_8b

        t = time.perf_counter()
        build_random_8b(args.build, like=args.like)
        log(f"built random Qwen3-VL-8B from {args.like} in {time.perf_counter() - t:.0f}s")
    t = time.perf_counter()
    results.append({"path": "data", **make_data(args.data, args.n_test, args.n_train), "n_train": args.n_train, "seconds": round(time.perf_counter() - t, 1)})
    phases = args.phases.split(",")
    if "train" in phases:
        for backend in args.backends.split(","):
            results.append(train_row(args.build, args.data, args.runs / f"t_{backend}", f"mcvqa train --config configs/seed.yaml, model.backend={backend}", ["--set", f"model.backend={backend}"]))
            save()
    if "offload" in phases:  # the recipe offloads the checkpointed layers' inputs to host memory, as Unsloth does: the same without
        results.append(train_row(args.build, args.data, args.runs / "t_kept", "mcvqa train --config configs/seed.yaml, train.offload_checkpoints=false", ["--set", "train.offload_checkpoints=false"]))
        save()
    if "rows" in phases:  # the packed step attended row by row after the prefix instead of over the dense (T, T) mask
        results.append(train_row(args.build, args.data, args.runs / "t_rows", "mcvqa train --config configs/seed.yaml, train.shared_prefix=rows", ["--set", "train.shared_prefix=rows"]))
        save()
    if "packed" in phases:  # the packed step over the dense (T, T) mask (the recipe's step until the seventh session)
        results.append(train_row(args.build, args.data, args.runs / "t_packed", "mcvqa train --config configs/seed.yaml, train.shared_prefix=packed", ["--set", "train.shared_prefix=packed"]))
        save()
    if "nofuse" in phases:  # peft's own LoRA forward (clone, multiply, add) instead of the addmm epilogue
        results.append(train_row(args.build, args.data, args.runs / "t_nofuse", "mcvqa train --config configs/seed.yaml, lora.fused=false", ["--set", "lora.fused=false"]))
        save()
    for i, (label, sets, extra, env) in enumerate(variants):
        results.append(train_row(args.build, args.data, args.runs / f"v{i}_{label}", f"mcvqa train --config configs/seed.yaml, {label}: {sets or 'as is'}", extra, env))
        save()
    if "fp16" in phases:
        results.append(train_row(args.build, args.data, args.runs / "t_fp16", "mcvqa train --config configs/seed.yaml, model.dtype=fp16 (loss scaling)", ["--set", "model.dtype=fp16"]))
        save()
    if "train" in phases:
        try:
            results.append(plain_peft_row(args.build, args.data, args.plain_steps))
        except Exception as e:  # noqa: BLE001
            results.append({"path": "plain peft loop", "error": f"{type(e).__name__}: {str(e)[-1500:]}"})
        save()
    if "prequant" in phases:
        results += prequant_rows(args.build, args.data, args.runs)
        save()
    if "resume" in phases:
        results += resume_rows(args.build, args.data, args.runs)
        save()
    save()


if __name__ == "__main__":
    main()
