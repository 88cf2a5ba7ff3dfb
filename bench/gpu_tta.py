"""Time per question of every test-time method relative to plain scoring, on the 8B architecture (GPU).

    python bench/gpu_tta.py --build /tmp/q8b --quant nf4 --n 32 --out $OUT

Random weights (``bench/random_8b.py``) with a random LoRA adapter (r=32) attached, so the
LoRA-adapting methods and the base-model blend have something to work on. Accuracy is meaningless with
random weights; the cost is what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mcvqa.tta as A  # noqa: E402
from mcvqa.config import TTAConfig, load_config  # noqa: E402
from mcvqa.data import read_csv  # noqa: E402
from mcvqa.features import Encoder  # noqa: E402
from mcvqa.scoring import Scorer  # noqa: E402

METHODS = {
    "plain": TTAConfig(methods=[]),
    "orders": TTAConfig(methods=["orders"]),
    "pride": TTAConfig(methods=["pride"], pride_fraction=0.1),
    "views": TTAConfig(methods=["views"]),
    "orders+views": TTAConfig(methods=["orders", "views"]),
    "blend": TTAConfig(methods=["blend"]),
    "tent (lora)": TTAConfig(methods=["tent"], params="lora"),
    "sar (lora)": TTAConfig(methods=["sar"], params="lora", optimizer="sgd"),
    "sar + consistency": TTAConfig(methods=["sar"], params="lora", optimizer="sgd", consistency=1.0),
    "tpt": TTAConfig(methods=["tpt"]),
    "zero": TTAConfig(methods=["zero"]),
}


REAL_FILES = Path(__file__).resolve().parent.parent / ".fixtures" / "qwen3-vl-8b-instruct"
"""Copy of ../shared/fixtures/qwen3-vl-8b-instruct carried to the GPU machine (it does not travel by itself)."""

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path("/tmp/q8b"))
    ap.add_argument("--data", type=Path, default=Path("/tmp/bd"))
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=546)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    args = ap.parse_args()
    from gpu_bench import bench_prompt, versions

    from mcvqa.model import attach_lora, load_model
    from mcvqa.synth import SynthConfig, synthesize
    from random_8b import build_random_8b

    if not (args.build / "config.json").exists():
        # The real config and tokenizer when they are at hand (real token counts); else the local stand-in.
        like = REAL_FILES if (REAL_FILES / "config.json").exists() else None
        build_random_8b(args.build, like=like)
        print(f"token counts from {'the real Qwen3-VL files' if like else 'the LOCAL tokenizer (about 2x the real prefix)'}")
    if not (args.data / "test_labels.csv").exists():
        synthesize(args.data, SynthConfig(train=0, test=max(args.n, 64), size=(720, 540), option_order="random"))
    items = read_csv(args.data / "test_labels.csv").items[: args.n]
    cfg = load_config(None, [f"model.name_or_path={args.build}", f"model.quant={args.quant}", "image.size=512", "lora.r=32", "lora.alpha=32", "lora.dropout=0.0"], env=False)
    model, processor = load_model(cfg.model)
    model = attach_lora(model, cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    model.eval()
    scorer = Scorer(model, Encoder(processor, bench_prompt(processor.tokenizer, args.system_tokens), cfg.image))
    rows = []
    for name in args.methods.split(","):
        tta = METHODS[name]
        A.run(scorer, items[: min(4, args.n)], tta, batch_size=args.batch_size, progress=False)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = A.run(scorer, items, tta, batch_size=args.batch_size, progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = (time.perf_counter() - t) / len(items)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rows.append({"method": name, "s_per_question": secs, "forwards": res.cost.forwards, "backwards": res.cost.backwards, "peak_gib": peak})
        print(rows[-1], flush=True)
    base = rows[0]["s_per_question"]
    for r in rows:
        r["relative_to_plain"] = r["s_per_question"] / base
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tta_{args.quant}.json").write_text(json.dumps({"versions": versions(), "n": args.n, "rows": rows}, indent=2))
    print("\n| method | s/question | x plain | fwd/q | bwd/q | peak GiB |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['s_per_question']:.3f} | {r['relative_to_plain']:.1f} | {r['forwards']:.2f} | {r['backwards']:.0f} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
