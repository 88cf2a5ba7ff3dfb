"""Speed levers for issue 26, one at a time, in one call on the real 8B architecture (random weights).

    python bench/levers.py --out "$OUT" [--phases predict,train,data,profile]

* predict, model alone: pre-collated competition-like batches already on the GPU, ``Scorer.logprobs`` per batch,
  for each variant (each on a freshly loaded model): eager at several batch sizes, Liger's fused RMSNorm / SwiGLU /
  RoPE (``model.kernels``), ``torch.compile`` of norms and MLPs (``predict.compile=mlp``), FP8 row-wise linears
  (``model.quant=fp8``), nf4 eager and nf4 + Liger. Each variant's probabilities are compared with eager bf16 at
  the same batch size (argmax agreement, max |dp|, mean KL).
* train: the seed recipe's step (nf4 QLoRA r32, packed prefix, answer-only loss) at micro-batch 8 and 16 (a variant
  ``name:bs:mode`` sets ``train.shared_prefix``, e.g. ``liger:16:rows``; ``--profile-train`` profiles two steps), with
  and without Liger; samples/s and peak memory.
* data: the engine's DataLoader alone (decode, letterbox, processor, collate) with 4, 8 and 12 workers.
* profile: torch.profiler's top CUDA kernels for the fastest bf16 variant.

Prints a table; writes ``levers.json`` (raw rows, device, versions) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from e2e import add_build_arguments, make_data  # noqa: E402
from gpu_bench import log, sync, versions  # noqa: E402


def _cfg(model: Path, quant: str, extra: list[str] | None = None) -> Any:
    from mcvqa.config import load_config

    return load_config(None, [f"model.name_or_path={model}", f"model.quant={quant}", *(extra or [])], env=False)


def _agreement(ref: torch.Tensor, ours: torch.Tensor) -> dict[str, float]:
    p, q = ref.exp(), ours.exp()
    kl = (p * (ref - ours)).sum(-1)
    return {"argmax_agree": float((p.argmax(-1) == q.argmax(-1)).float().mean()), "max_abs_dp": float((p - q).abs().max()),
            "mean_kl": float(kl.mean())}


def _run(scorer: Any, batches: list) -> tuple[float, torch.Tensor]:
    sync()
    t = time.perf_counter()
    out = [scorer.logprobs(b) for b in batches]
    sync()
    return time.perf_counter() - t, torch.cat([o.float().cpu() for o in out])


def predict_phase(args: argparse.Namespace, items: list, rows: list) -> None:
    """Each variant on a freshly loaded model (variants: ``eager``, ``liger``, ``fp8``, ``nf4``, ``compile``, ``cvision``,
    ``syncmerge``, joined with ``+``), eager's probabilities kept per batch size as the reference of the others."""
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    refs: dict[int, torch.Tensor] = {}
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        try:
            _predict_variant(args, items, rows, variant, sizes, refs)
        except Exception as e:  # one failing lever must not cost the others' figures
            import traceback

            rows.append({"phase": "predict", "variant": variant, "error": f"{type(e).__name__}: {e}"[:600]})
            log(traceback.format_exc()[-3000:])
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _predict_variant(args: argparse.Namespace, items: list, rows: list, variant: str, sizes: list[int], refs: dict) -> None:
    from mcvqa import kernels
    from mcvqa.families import core_and_head
    from mcvqa.features import Collator
    from mcvqa.predict import build_scorer

    parts = set(variant.split("+"))
    quant = "nf4" if "nf4" in parts else "fp8" if "fp8" in parts else "none"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # The production path: model.kernels and model.quant as a user sets them.
    scorer = build_scorer(_cfg(args.build, quant, [f"model.kernels={'liger' if 'liger' in parts else 'off'}"]))
    core, _ = core_and_head(scorer.model)
    applied: dict[str, Any] = {}
    if "compile" in parts:
        applied["compiled"] = kernels.compile_blocks(core, "mlp")
    if "cvision" in parts:
        applied["compiled"] = kernels.compile_blocks(core, "vision")
    if "syncmerge" in parts:  # transformers' image merge, which waits for the GPU (the A/B of merge_without_sync)
        kernels.restore_merge(core)
    load = time.perf_counter() - t0
    enc = scorer.encoder
    collate = Collator(enc, with_prefix=False)
    exs = [enc.encode(it) for it in items[: args.n]]
    order = sorted(range(len(exs)), key=lambda i: len(exs[i].suffix_ids))
    for bs in sizes:
        if variant != "eager" and bs not in (max(sizes), 32):
            continue
        batches = [collate([exs[i] for i in order[s : s + bs]]).to(scorer.device) for s in range(0, len(exs), bs)]
        t1 = time.perf_counter()
        scorer.logprobs(batches[0])
        scorer.logprobs(batches[-1])
        sync()
        first = time.perf_counter() - t1
        torch.cuda.reset_peak_memory_stats()
        dt, lp = _run(scorer, batches)
        dt2, _ = _run(scorer, batches)
        row = {"phase": "predict", "variant": variant, "batch": bs, "q_per_s": round(len(exs) / min(dt, dt2), 1),
               "q_per_s_runs": [round(len(exs) / dt, 1), round(len(exs) / dt2, 1)], "warmup_s": round(first, 1),
               "load_s": round(load, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "applied": applied}
        if variant == "eager":
            refs[bs] = lp
        elif bs in refs:
            row.update(_agreement(refs[bs], lp))
        rows.append(row)
        log(row)
        del batches
    if variant in args.profile_variant.split(","):
        profile(scorer, exs, order, max(sizes), args, rows, variant)
    del scorer, core


def profile(scorer: Any, exs: list, order: list, bs: int, args: argparse.Namespace, rows: list, variant: str) -> None:
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    from mcvqa.families import core_and_head
    from mcvqa.features import Collator

    collate = Collator(scorer.encoder, with_prefix=False)
    batches = [collate([exs[i] for i in order[s : s + bs]]).to(scorer.device) for s in range(0, len(exs), bs)][:3]
    core, _ = core_and_head(scorer.model)
    times: dict[str, float] = {}

    def wrap(owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a: Any, **k: Any) -> Any:
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
            return out

        setattr(owner, attr, timed)

    wrap(core.visual, "forward", "vision")
    wrap(core.language_model, "forward", "language model")
    wrap(scorer.family, "positions", "positions")
    for b in batches:
        scorer.logprobs(b)
    times.clear()
    sync()
    t = time.perf_counter()
    for b in batches:
        scorer.logprobs(b)
    sync()
    total = time.perf_counter() - t
    rows.append({"phase": "breakdown", "variant": variant, "batch": bs, "total_ms": round(1000 * total / len(batches), 1),
                 **{f"{k}_ms": round(1000 * v / len(batches), 1) for k, v in times.items()}})
    log(rows[-1])
    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches:
            scorer.logprobs(b)
        sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45)
    (args.out / f"levers_profile_{variant.replace('+', '_')}.txt").write_text(table)
    log(table)


def train_phase(args: argparse.Namespace, items: list, rows: list) -> None:
    from mcvqa.features import Collator, Encoder
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import letter_tokens
    from mcvqa.train.build import build_model
    from mcvqa.train.loss import AnswerLoss

    for variant in [v for v in args.train_variants.split(",") if v]:
        name, bs, *rest = variant.split(":")
        bs, mode = int(bs), (rest[0] if rest else "packed")  # mode: train.shared_prefix (packed | rows | cache)
        torch.cuda.empty_cache()
        cfg = _cfg(args.build, "nf4", ["train.batch_size=8", f"model.kernels={'liger' if 'liger' in name else 'off'}"])
        model, processor = build_model(cfg)
        model.train()
        enc = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image)
        letters = letter_tokens(processor.tokenizer)
        module = AnswerLoss(model, enc.prefix_ids, letters.target, shared_prefix=mode)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
        collate = Collator(enc, with_prefix=False)
        exs = [enc.encode(it) for it in items[: bs * (args.train_steps + 2)]]
        device = next(model.parameters()).device

        def step(chunk: list) -> float:
            batch = collate(chunk).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = module(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        step(exs[:bs])
        step(exs[bs : 2 * bs])
        torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        losses = [step(exs[(k + 2) * bs : (k + 3) * bs]) for k in range(args.train_steps)]
        sync()
        dt = time.perf_counter() - t
        rows.append({"phase": "train", "variant": variant, "micro_batch": bs, "shared_prefix": mode, "samples_per_s": round(bs * args.train_steps / dt, 2),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "losses": [round(x, 3) for x in losses]})
        log(rows[-1])
        if variant in args.profile_train.split(","):  # where a step's GPU time goes: attention's share above all
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile as prof_ctx

            with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for k in range(2):
                    step(exs[k * bs : (k + 1) * bs])
                sync()
            events = prof.key_averages()
            table = events.table(sort_by="self_cuda_time_total", row_limit=45)
            (args.out / f"levers_train_profile_{variant.replace(':', '_')}.txt").write_text(table)
            # Kernels only: an operator's own device time already holds the kernels it launched, listed again as theirs.
            kernels = [e for e in events if e.device_type == DeviceType.CUDA]
            total = sum(e.self_device_time_total for e in kernels)
            attention = sum(e.self_device_time_total for e in kernels if any(s in e.key.lower() for s in ("attention", "fmha", "flash", "sdpa")))
            rows.append({"phase": "train_profile", "variant": variant, "cuda_ms_per_step": round(total / 2000, 1),
                         "attention_share": round(attention / total, 3) if total else None})
            log(rows[-1])
        del model, module, opt
        import gc

        gc.collect()


def data_phase(args: argparse.Namespace, items: list, rows: list) -> None:
    from mcvqa.engine import iterate_batches
    from mcvqa.features import Encoder
    from mcvqa.model import load_processor
    from mcvqa.prompts import load_prompt

    cfg = _cfg(args.build, "none")
    enc = Encoder(load_processor(str(args.build)), load_prompt(cfg.prompt.name), cfg.image)
    n = min(len(items), 1000)
    for workers in [int(x) for x in args.workers.split(",")]:
        bs = 64
        batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
        t = time.perf_counter()
        count = sum(len(b) for b in iterate_batches(items[:n], enc, batches, with_prefix=False, num_workers=workers))
        dt = time.perf_counter() - t
        rows.append({"phase": "data", "workers": workers, "q_per_s": round(count / dt, 1), "seconds": round(dt, 1)})
        log(rows[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(ap)
    ap.add_argument("--phases", default="data,predict,train")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=3887)
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--variants", default="eager,liger,liger+cvision,compile,fp8+liger,nf4,nf4+liger")
    ap.add_argument("--profile-variant", default="liger", help="variants to profile, comma-separated")
    ap.add_argument("--train-variants", default="peft:8,peft:16,liger:8,liger:16")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--profile-train", default="", help="train variants to profile (two steps), comma-separated")
    ap.add_argument("--workers", default="4,8,12")
    ap.add_argument("--json", default="levers.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    log(info)
    save = lambda: (args.out / args.json).write_text(json.dumps({"versions": info, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2, default=str))

    class Rows(list):  # every row on disk as soon as it exists: a call cut by its time limit keeps what it measured
        def append(self, row: Any) -> None:
            super().append(row)
            save()

    rows: list[dict[str, Any]] = Rows()
    if not (args.build / "config.json").exists():
        from random_8b import build_random_8b

        t = time.perf_counter()
        build_random_8b(args.build, like=args.like)
        log(f"built random 8B in {time.perf_counter() - t:.0f}s")

    from mcvqa.data import read_csv

    t = time.perf_counter()
    make_data(args.data, args.n_test, 480)
    log(f"data in {time.perf_counter() - t:.0f}s")
    test = read_csv(args.data / "test.csv").items
    train = read_csv(args.data / "train.csv").items
    for phase in args.phases.split(","):
        try:
            {"data": lambda: data_phase(args, test, rows), "predict": lambda: predict_phase(args, test, rows),
             "train": lambda: train_phase(args, train, rows)}[phase]()
        except Exception as e:  # one failing lever must not cost the others' figures
            import traceback

            rows.append({"phase": phase, "error": f"{type(e).__name__}: {e}"[:600]})
            log(traceback.format_exc()[-3000:])
        save()
    for r in rows:
        log(" | ".join(f"{k}={v}" for k, v in r.items() if k not in ("applied", "losses")))


if __name__ == "__main__":
    main()
