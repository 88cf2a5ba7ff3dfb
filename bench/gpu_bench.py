"""GPU benchmarks: mcvqa's scoring and training against the reference methods, same card, same run.

    python bench/gpu_bench.py --build /tmp/q8b --phases predict,train --out results/

Builds the real Qwen3-VL-8B-Instruct architecture with random bf16 weights (``bench/random_8b.py``),
saves it and loads it back through ``mcvqa.model.load_model`` - the production path, in bf16 and nf4.
Conditions (issue 4): a ~1,200-token few-shot system prompt, one 512x512 letterboxed image (256 visual
tokens) or a 540x720 photo at native resolution (~380 tokens), ~60 tokens of question and options.

Rows (questions or samples per second, peak GPU memory):
  predict  reference   batch 1, generate(max_new_tokens=1, output_scores), softmax of the letter scores
           batched     one forward per 16 questions, whole sequence, last-position logits (no cache)
           mcvqa       system-prompt KV cache + batched forward + letter rows of the head only
           mcvqa-4ord  all 4 cyclic option orders, image+question prefix shared (reported per question)
  train    plain       transformers + peft, bs 8, gradient checkpointing, HF loss over full-sequence logits
           mcvqa       shared system prefix once per batch, LM head at the answer position only
Exactness: argmax agreement and max |p - p_ref| of mcvqa's batched cached scores against the unbatched,
uncached forward.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mcvqa.config import load_config  # noqa: E402
from mcvqa.data import read_csv  # noqa: E402
from mcvqa.features import Encoder, collate, cyclic_orders  # noqa: E402
from mcvqa.prompts import Prompt, load_prompt  # noqa: E402
from mcvqa.scoring import Scorer, letter_tokens, score_generate  # noqa: E402


REAL_FILES = Path(__file__).resolve().parent.parent / ".fixtures" / "qwen3-vl-8b-instruct"
"""Copy of ../shared/fixtures/qwen3-vl-8b-instruct carried to the GPU machine (it does not travel by itself)."""

def log(*a: Any) -> None:
    print(*a, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_prompt(tokenizer: Any, target: int) -> Prompt:
    """The few-shot prompt, its examples repeated until the system turn is ~``target`` tokens."""
    base = load_prompt("fewshot_ko")
    head, _, examples = base.system.partition("\n\n예시 1")
    examples = "예시 1" + examples
    text = base.system
    while len(tokenizer.encode(text)) < target:
        text += "\n\n" + examples
    # Trim by characters to land just under the target.
    while len(tokenizer.encode(text)) > target:
        text = text[: -max(1, (len(tokenizer.encode(text)) - target) // 2)]
    return Prompt("bench", text.strip(), base.question_template, base.options_header, base.option_template, base.instruction)


def gpu_mem() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_mem() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, repeat: int = 1) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


# ----------------------------------------------------------------------------------------------- predict


def set_attention(model: Any, name: str) -> None:
    """Baselines run transformers' stock SDPA (text and vision); mcvqa rows run mcvqa's attention."""
    from mcvqa.kernels import use_causal_attention
    from mcvqa.families import core_and_head

    core = core_and_head(model)[0]
    core.language_model.config._attn_implementation = "sdpa"
    core.visual.config._attn_implementation = "sdpa"
    if name != "sdpa":
        use_causal_attention(core_and_head(model)[0])


def agreement(ref: torch.Tensor, ours: torch.Tensor, what: str, n: int) -> dict[str, Any]:
    top2 = ref.topk(2, dim=-1).values
    return {
        "path": what, "argmax_agreement": (ref.argmax(-1) == ours.argmax(-1)).float().mean().item(),
        "max_abs_prob_diff": (ref - ours).abs().max().item(), "mean_abs_prob_diff": (ref - ours).abs().mean().item(),
        "median_top1_top2_gap": (top2[:, 0] - top2[:, 1]).median().item(), "n": n,
    }


def bench_predict(model: Any, processor: Any, prompt: Prompt, cfg: Any, items: list, args: argparse.Namespace, tag: str) -> list[dict[str, Any]]:
    from mcvqa.kernels import CAUSAL_ATTENTION

    enc = Encoder(processor, prompt, cfg.image)
    rows: list[dict[str, Any]] = []
    n_ref, n = min(args.n_reference, len(items)), min(args.n, len(items))
    exs = [enc.encode(it) for it in items[:n]]  # images decoded up front: the GPU is what we time
    suffix = sum(len(e.suffix_ids) for e in exs) / len(exs)
    log(f"[{tag}] prefix {len(enc.prefix_ids)} tokens, suffix {suffix:.0f} tokens (image {len(exs[0].image_ids) - 2})")
    meta = {"prefix_tokens": len(enc.prefix_ids), "suffix_tokens": round(suffix, 1), "image_tokens": len(exs[0].image_ids) - 2}

    # reference: batch 1, generate one token with scores
    def ref_one(e):
        return score_generate(model, enc, collate([e], enc.pad_id, enc.prefix_ids), max_new_tokens=1)[0]

    set_attention(model, "sdpa")
    ref_one(exs[0])
    reset_mem()
    t = timed(lambda: [ref_one(e) for e in exs[:n_ref]])
    rows.append({"path": "reference: batch 1, generate 1 token", "q_per_s": n_ref / t, "peak_gib": gpu_mem(), **meta})
    log(rows[-1])

    # batched full-sequence forward, last position only, no cache
    plain = Scorer(model, enc, prefix_cache=False)
    def run_plain(bs):
        for s in range(0, n, bs):
            plain.logprobs(collate(exs[s : s + bs], enc.pad_id, enc.prefix_ids))
    run_plain(16)
    reset_mem()
    t = timed(lambda: run_plain(16))
    rows.append({"path": "batched forward bs 16, last position, no cache", "q_per_s": n / t, "peak_gib": gpu_mem(), **meta})
    log(rows[-1])

    # noise floor: the same bf16 forward batched vs one question at a time (no cache either way)
    with torch.no_grad():
        one = torch.cat([plain.logprobs(collate([e], enc.pad_id, enc.prefix_ids)) for e in exs[: args.n_exact]]).exp()
        many = torch.cat([plain.logprobs(collate(exs[s : min(s + 16, args.n_exact)], enc.pad_id, enc.prefix_ids)) for s in range(0, args.n_exact, 16)]).exp()
    rows.append(agreement(one, many, "noise floor: stock batched bs 16 vs unbatched", args.n_exact))
    log(rows[-1])

    # mcvqa with transformers' stock SDPA (the materialised-mask path), for the attention lever
    scorer = Scorer(model, enc, prefix_cache=True)
    bs0 = args.batch_sizes[0]
    def run_stock():
        for s in range(0, n, bs0):
            scorer.logprobs(collate(exs[s : s + bs0], enc.pad_id))
    run_stock()
    reset_mem()
    t = timed(run_stock)
    rows.append({"path": f"mcvqa with stock sdpa (materialised mask), bs {bs0}", "q_per_s": n / t, "peak_gib": gpu_mem(), **meta})
    log(rows[-1])

    # mcvqa: prefix cache + bottom-right causal SDPA + batched vision attention + length-sorted batches
    set_attention(model, CAUSAL_ATTENTION)
    scorer.invalidate()
    exs = sorted(exs, key=lambda e: len(e.suffix_ids))  # what predict does (sort_by_length)
    best = None
    for bs in args.batch_sizes:
        def run(bs=bs):
            for s in range(0, n, bs):
                scorer.logprobs(collate(exs[s : s + bs], enc.pad_id))
        try:
            run()
            reset_mem()
            t = timed(run)
        except torch.OutOfMemoryError:
            log(f"bs {bs}: out of memory")
            reset_mem()
            continue
        row = {"path": f"mcvqa: prefix cache, bs {bs}", "q_per_s": n / t, "peak_gib": gpu_mem(), **meta}
        rows.append(row)
        log(row)
        best = row if best is None or row["q_per_s"] > best["q_per_s"] else best

    # exactness vs the unbatched, uncached forward (stock attention: the plainest reference there is)
    with torch.no_grad():
        set_attention(model, "sdpa")
        ref = torch.cat([plain.logprobs(collate([e], enc.pad_id, enc.prefix_ids)) for e in exs[: args.n_exact]]).exp()
        set_attention(model, CAUSAL_ATTENTION)
        bs = max(args.batch_sizes)
        ours = torch.cat([scorer.logprobs(collate(exs[s : min(s + bs, args.n_exact)], enc.pad_id)) for s in range(0, args.n_exact, bs)]).exp()
    rows.append(agreement(ref, ours, "mcvqa vs unbatched uncached", args.n_exact))
    log(rows[-1])

    # four cyclic orders, shared image+question prefix
    orders = cyclic_orders(4)
    oex = [enc.encode_orders(it, orders) for it in items[:n]]
    best4 = None
    for bs in args.order_batch_sizes:
        def run4(bs=bs):
            for s in range(0, n, bs):
                scorer.logprobs_orders(oex[s : s + bs])
        try:
            run4()
            reset_mem()
            t = timed(run4)
        except torch.OutOfMemoryError:
            log(f"4 orders bs {bs}: out of memory")
            reset_mem()
            continue
        row = {"path": f"mcvqa: 4 cyclic orders, shared prefix, bs {bs}", "q_per_s": n / t, "peak_gib": gpu_mem(), **meta}
        rows.append(row)
        log(row)
        best4 = row if best4 is None or row["q_per_s"] > best4["q_per_s"] else best4
    ref_qps = rows[0]["q_per_s"]
    batched_row = next(r for r in rows if r["path"].startswith("batched forward"))
    summary = {
        "path": "summary",
        "predict_speedup_vs_reference": best["q_per_s"] / ref_qps if best else None,
        "four_orders_speedup_vs_reference_single_order": best4["q_per_s"] / ref_qps if best4 else None,
        "predict_speedup_vs_batched": best["q_per_s"] / batched_row["q_per_s"] if best else None,
    }
    rows.append(summary)
    log(summary)
    for r in rows:
        r["setting"] = tag
    return rows


def bench_compiled(model: Any, processor: Any, prompt: Prompt, cfg: Any, items: list, args: argparse.Namespace, tag: str, scope: str) -> list[dict[str, Any]]:
    """mcvqa's fast path with ``predict.compile=<scope>``: speed, compile time, and exactness vs unbatched uncached."""
    from mcvqa.kernels import CAUSAL_ATTENTION, compile_blocks
    from mcvqa.families import core_and_head

    enc = Encoder(processor, prompt, cfg.image)
    n = min(args.n, len(items))
    exs = sorted((enc.encode(it) for it in items[:n]), key=lambda e: len(e.suffix_ids))
    with torch.no_grad():
        set_attention(model, "sdpa")
        plain = Scorer(model, enc, prefix_cache=False)
        ref = torch.cat([plain.logprobs(collate([e], enc.pad_id, enc.prefix_ids)) for e in exs[: args.n_exact]]).exp()
    set_attention(model, CAUSAL_ATTENTION)
    compile_blocks(core_and_head(model)[0], scope)
    scorer = Scorer(model, enc, prefix_cache=True)
    rows = []
    for bs in args.batch_sizes:
        def run(bs=bs):
            for s in range(0, n, bs):
                scorer.logprobs(collate(exs[s : s + bs], enc.pad_id))
        try:
            t0 = time.perf_counter()
            run()  # compiles (once per new shape class)
            first = time.perf_counter() - t0
            reset_mem()
            t = timed(run)
        except torch.OutOfMemoryError:
            log(f"compiled bs {bs}: out of memory")
            reset_mem()
            continue
        rows.append({"path": f"mcvqa + compile {scope}: prefix cache, bs {bs}", "q_per_s": n / t, "peak_gib": gpu_mem(), "first_pass_s": first})
        log(rows[-1])
    bs = max(args.batch_sizes)
    with torch.no_grad():
        ours = torch.cat([scorer.logprobs(collate(exs[s : min(s + bs, args.n_exact)], enc.pad_id)) for s in range(0, args.n_exact, bs)]).exp()
    rows.append(agreement(ref, ours, f"mcvqa + compile {scope} vs unbatched uncached", args.n_exact))
    log(rows[-1])
    for r in rows:
        r["setting"] = tag
    return rows


# ----------------------------------------------------------------------------------------------- train


def plain_peft_model(cfg: Any) -> tuple[Any, Any]:
    """The usual QLoRA/LoRA setup: prepare_model_for_kbit_training (4-bit), get_peft_model, HF checkpointing."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from mcvqa.model import load_model

    model, processor = load_model(cfg.model)
    if cfg.model.quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, use_rslora=True,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    return get_peft_model(model, lora), processor


def bench_train(cfg: Any, prompt: Prompt, items: list, args: argparse.Namespace, tag: str) -> list[dict[str, Any]]:
    from mcvqa.train import AnswerLoss, build_model, param_groups

    rows = []
    for method, bs in args.train_runs:
        reset_mem()
        if method == "plain":
            model, processor = plain_peft_model(cfg)
        else:
            sets = []
            if method.startswith("mcvqa-ckpt") and method[len("mcvqa-ckpt"):].isdigit():
                sets.append(f"train.checkpoint_every_n_layers={int(method.removeprefix('mcvqa-ckpt'))}")
            elif method == "mcvqa-nockpt":
                sets.append("train.gradient_checkpointing=false")
            run_cfg = cfg
            if sets:
                from mcvqa.config import parse_overrides
                import copy, dataclasses

                run_cfg = copy.deepcopy(cfg)
                for section, values in parse_overrides(sets).items():
                    setattr(run_cfg, section, dataclasses.replace(getattr(run_cfg, section), **values))
            model, processor = build_model(run_cfg)
        model.train()
        enc = Encoder(processor, prompt, cfg.image)
        letters = letter_tokens(processor.tokenizer)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        exs = [enc.encode(it) for it in items[: bs * (args.train_steps + 2)]]
        device = next(model.parameters()).device
        dtype = torch.bfloat16

        if method == "plain":
            # What a plain transformers + peft loop does: the whole sequence through the model, HF's loss
            # with every label masked but the answer, i.e. full-sequence logits.
            def step(batch_exs):
                ids_rows = [enc.prefix_ids + e.suffix_ids + [letters.target[e.label]] for e in batch_exs]
                width = max(len(r) for r in ids_rows)
                ids = torch.full((len(ids_rows), width), enc.pad_id, dtype=torch.long)
                att = torch.zeros_like(ids)
                labels = torch.full_like(ids, -100)
                for i, r in enumerate(ids_rows):
                    ids[i, : len(r)] = torch.tensor(r)
                    att[i, : len(r)] = 1
                    labels[i, len(r) - 1] = r[-1]
                ids, att, labels = ids.to(device), att.to(device), labels.to(device)
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    out = model(
                        input_ids=ids, attention_mask=att, labels=labels,
                        pixel_values=torch.cat([e.vision["pixel_values"] for e in batch_exs]).to(device),
                        image_grid_thw=torch.cat([e.vision["image_grid_thw"] for e in batch_exs]).to(device),
                        mm_token_type_ids=(ids == enc.image_token_id).int(),
                    )
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            module = AnswerLoss(model, enc.prefix_ids, letters.target, shared_prefix="cache" if "cache" in method else "packed")
            if torch.cuda.is_available():
                from mcvqa.families import core_and_head

                log(f"  attention: {core_and_head(model)[0].language_model.config._attn_implementation}")

            def step(batch_exs):
                batch = collate(batch_exs, enc.pad_id).to(device)
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    loss, _ = module(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        try:
            step(exs[:bs])
            step(exs[bs : 2 * bs])
            reset_mem()
            t = timed(lambda: [step(exs[(k + 2) * bs : (k + 3) * bs]) for k in range(args.train_steps)])
            row = {"path": f"train {method} bs {bs}", "samples_per_s": bs * args.train_steps / t, "peak_gib": gpu_mem(), "setting": tag}
            if args.profile and torch.cuda.is_available():
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step(exs[:bs])
                    sync()
                log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile))
        except torch.OutOfMemoryError:
            row = {"path": f"train {method} bs {bs}", "samples_per_s": None, "peak_gib": "OOM", "setting": tag}
        log(row)
        rows.append(row)
        del model, opt
        reset_mem()
    return rows


# ----------------------------------------------------------------------------------------------- main


def bench_exact32(args: argparse.Namespace, _unused: Any = None) -> list[dict[str, Any]]:
    """fp32 on the GPU: cached + batched equals unbatched + uncached up to fp32 rounding (the logic is exact)."""
    from mcvqa.model import load_model

    if not (args.data / "test_labels.csv").exists():
        from mcvqa.synth import SynthConfig, synthesize

        synthesize(args.data, SynthConfig(train=0, test=max(args.n, 64), size=(720, 540), option_order="random"))
    items = read_csv(args.data / "test_labels.csv").items[:32]
    cfg = load_config(None, [f"model.name_or_path={args.build}", "model.dtype=fp32", "image.size=512"], env=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reset_mem()
    model, processor = load_model(cfg.model)
    enc = Encoder(processor, bench_prompt(processor.tokenizer, args.system_tokens), cfg.image)
    exs = [enc.encode(it) for it in items]
    with torch.no_grad():
        set_attention(model, "sdpa")
        plain = Scorer(model, enc, prefix_cache=False)
        ref = torch.cat([plain.logprobs(collate([e], enc.pad_id, enc.prefix_ids)) for e in exs]).exp()
        set_attention(model, "mcvqa")
        scorer = Scorer(model, enc, prefix_cache=True)
        ours = torch.cat([scorer.logprobs(collate(exs[s : s + 16], enc.pad_id)) for s in range(0, len(exs), 16)]).exp()
    row = agreement(ref, ours, "fp32: mcvqa (cache, bs 16) vs unbatched uncached", len(exs))
    row["setting"] = "fp32 letterbox"
    log(row)
    del model
    reset_mem()
    return [row]


def bench_exact_vs_fp32(args: argparse.Namespace) -> list[dict[str, Any]]:
    """How far is each low-precision path from the fp32 truth? Unbatched uncached fp32 probabilities first, then
    per precision both the unbatched uncached forward (the exactness target's reference) and mcvqa's path.

    If mcvqa-bf16 is as close to fp32 as the reference-bf16 is, its distance to the reference is bf16 rounding
    that neither path can avoid, not an error of the method.
    """
    from mcvqa.model import load_model
    from mcvqa.kernels import CAUSAL_ATTENTION

    if not (args.data / "test_labels.csv").exists():
        from mcvqa.synth import SynthConfig, synthesize

        synthesize(args.data, SynthConfig(train=0, test=max(args.n, 64), size=(720, 540), option_order="random"))
    items = read_csv(args.data / "test_labels.csv").items[: args.n_exact]
    rows: list[dict[str, Any]] = []

    def paths(quant: str, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = load_config(None, [f"model.name_or_path={args.build}", f"model.quant={quant}", f"model.dtype={dtype}", "image.size=512"], env=False)
        reset_mem()
        model, processor = load_model(cfg.model)
        enc = Encoder(processor, bench_prompt(processor.tokenizer, args.system_tokens), cfg.image)
        exs = [enc.encode(it) for it in items]
        with torch.no_grad():
            set_attention(model, "sdpa")
            plain = Scorer(model, enc, prefix_cache=False)
            ref = torch.cat([plain.logprobs(collate([e], enc.pad_id, enc.prefix_ids)) for e in exs]).exp().cpu()
            set_attention(model, CAUSAL_ATTENTION)
            scorer = Scorer(model, enc, prefix_cache=True)
            ours = torch.cat([scorer.logprobs(collate(exs[s : s + 32], enc.pad_id)) for s in range(0, len(exs), 32)]).exp().cpu()
        del model, plain, scorer
        reset_mem()
        return ref, ours

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    truth, ours32 = paths("none", "fp32")
    rows.append(agreement(truth, ours32, "fp32: mcvqa vs unbatched uncached fp32", len(items)))
    log(rows[-1])
    for quant, dtype, tag in (("none", "bf16", "bf16"), ("nf4", "bf16", "nf4")):
        ref, ours = paths(quant, dtype)
        for what, x in ((f"{tag}: unbatched uncached vs fp32 truth", ref), (f"{tag}: mcvqa vs fp32 truth", ours)):
            rows.append(agreement(truth, x, what, len(items)))
            log(rows[-1])
        rows.append(agreement(ref, ours, f"{tag}: mcvqa vs unbatched uncached {tag}", len(items)))
        log(rows[-1])
    for r in rows:
        r["setting"] = "precision letterbox"
    return rows


def versions() -> dict[str, str]:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "bitsandbytes", "accelerate"):
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            v[name] = "absent"
    if torch.cuda.is_available():
        v["device"] = torch.cuda.get_device_name(0)
        v["cuda"] = torch.version.cuda or ""
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path("/tmp/q8b"), help="where the random 8B checkpoint is (built if missing)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench_data"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    ap.add_argument("--json", default="bench.json", help="results file name under --out")
    ap.add_argument("--phases", default="predict,train")
    ap.add_argument("--quants", default="none,nf4")
    ap.add_argument("--modes", default="letterbox", help="letterbox,native")
    ap.add_argument("--system-tokens", type=int, default=546, help="system prompt length; 546 = fewshot_ko under the real tokenizer (1,200 was the local tokenizer's count)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--n-reference", type=int, default=48)
    ap.add_argument("--n-exact", type=int, default=128)
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--order-batch-sizes", default="8,16")
    ap.add_argument("--train-runs", default="plain:8,mcvqa:8,mcvqa:16")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--profile", type=int, default=0, help="train phase: print the top-N kernels of one profiled step per run")
    ap.add_argument("--compile", default="", help="predict phase: also time mcvqa with predict.compile=<scope> for each of these (mlp,layers), on a fresh load")
    args = ap.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.order_batch_sizes = [int(x) for x in args.order_batch_sizes.split(",")]
    args.train_runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.train_runs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    log(info)

    from mcvqa.synth import SynthConfig, synthesize
    from random_8b import build_random_8b

    if not (args.build / "config.json").exists():
        t = time.perf_counter()
        # The real config and tokenizer when they are at hand (real token counts); else the local stand-in.
        like = REAL_FILES if (REAL_FILES / "config.json").exists() else None
        build_random_8b(args.build, like=like)
        log(f"token counts from {'the real Qwen3-VL files' if like else 'the LOCAL tokenizer (about 2x the real prefix)'}")
        log(f"built random Qwen3-VL-8B in {time.perf_counter() - t:.0f}s")
    if not (args.data / "test.csv").exists():
        synthesize(args.data, SynthConfig(train=0, test=max(args.n, 64), size=(720, 540), option_order="random"))
    items = read_csv(args.data / "test_labels.csv").items  # labelled: training needs answers
    from mcvqa.model import load_model

    results: list[dict[str, Any]] = []
    if "exact32" in args.phases:
        results += bench_exact32(args)
    if "vsfp32" in args.phases:
        results += bench_exact_vs_fp32(args)
        (args.out / args.json).write_text(json.dumps({"versions": info, "results": results}, indent=2))
    for quant in args.quants.split(","):
        for mode in args.modes.split(","):
            tag = f"{'bf16' if quant == 'none' else quant} {mode}"
            image = ["image.mode=letterbox", "image.size=512"] if mode == "letterbox" else ["image.mode=native"]
            cfg = load_config(None, [f"model.name_or_path={args.build}", f"model.quant={quant}", *image], env=False)
            if "predict" in args.phases:
                reset_mem()
                t = time.perf_counter()
                model, processor = load_model(cfg.model)
                log(f"[{tag}] loaded in {time.perf_counter() - t:.0f}s, weights {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
                prompt = bench_prompt(processor.tokenizer, args.system_tokens)
                results += bench_predict(model, processor, prompt, cfg, items, args, tag)
                (args.out / args.json).write_text(json.dumps({"versions": info, "results": results}, indent=2))
                del model
                reset_mem()
                for scope in filter(None, args.compile.split(",")):
                    model, processor = load_model(cfg.model)
                    results += bench_compiled(model, processor, prompt, cfg, items, args, tag, scope)
                    (args.out / args.json).write_text(json.dumps({"versions": info, "results": results}, indent=2))
                    del model
                    torch._dynamo.reset()
                    reset_mem()
            if "train" in args.phases:
                tcfg = load_config(None, [f"model.name_or_path={args.build}", f"model.quant={quant}", *image, "lora.r=32", "lora.alpha=32", "lora.dropout=0.05"], env=False)
                from mcvqa.model import load_processor

                prompt = bench_prompt(load_processor(str(args.build)).tokenizer, args.system_tokens)
                results += bench_train(tcfg, prompt, items, args, tag)
            (args.out / args.json).write_text(json.dumps({"versions": info, "results": results}, indent=2))
    log("\n| setting | path | q/s or samples/s | peak GiB |")
    for r in results:
        rate = r.get("q_per_s", r.get("samples_per_s"))
        if rate is not None and not isinstance(rate, str):
            log(f"| {r['setting']} | {r['path']} | {rate:.2f} | {r.get('peak_gib', '')} |")
        else:
            log(f"| {r['setting']} | {r['path']} | {json.dumps({k: v for k, v in r.items() if k not in ('setting', 'path')})} |")


if __name__ == "__main__":
    main()
