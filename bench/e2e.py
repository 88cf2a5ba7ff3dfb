"""End to end, as a user runs it: the real commands on a competition-size input, timed from process start,
with the reference in the same call (issues 15 and 17).

    python bench/e2e.py --like .fixtures/qwen3-vl-8b-instruct --out "$OUT" --phases data,predict,reference,train

* The model: the real Qwen3-VL-8B-Instruct architecture with random bf16 weights, built from the real
  ``config.json`` with the real tokenizer, chat template and processor (``build_random_8b(like=...)``), so
  every token count is the real one: the few-shot system prompt is 546 tokens, a question 60-150.
* The data: 3,887 questions in the competition's CSV format, 720x540 / 540x720 JPEG photos with texture
  (~65 KB, like the competition's), Korean questions; 480 labelled rows for training.
* mcvqa, through the CLI (``python -m mcvqa ...`` in a subprocess; wall time from process start):
  ``predict`` in bf16 and nf4 on 3,887 and on 200 questions (steady rate = the difference), ``--tta orders``
  against plain on the same 1,000, ``train --config configs/seed.yaml`` (nf4 QLoRA, 480 samples, 1 epoch).
* The reference, same machine, same call: its predict loop as it ran (processor called per question on the
  decoded photo, letterbox 512, batch-1 ``generate`` of one token, an 883-token few-shot system prompt), and a
  plain transformers + peft QLoRA step (``bench/gpu_bench.py``'s ``plain`` run, bs 8).

Prints one table and writes ``e2e.json`` (raw rows with device and versions) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from gpu_bench import bench_prompt, gpu_mem, log, reset_mem, sync, versions  # noqa: E402


def _texture(job: tuple[str, int]) -> int:
    import numpy as np
    from PIL import Image, ImageFilter

    path, seed = job
    rng = np.random.default_rng(seed)
    img = Image.open(path).convert("RGB")
    noise = rng.normal(0, 18, (img.size[1] // 2, img.size[0] // 2, 3))
    grain = Image.fromarray(np.clip(noise + 128, 0, 255).astype("uint8")).resize(img.size).filter(ImageFilter.GaussianBlur(0.6))
    Image.blend(img, grain, 0.35).save(path, format="JPEG", quality=88)
    return Path(path).stat().st_size


def textured_photos(folder: Path) -> float:
    """Give the synthetic pictures a photo's texture (and so a photo's JPEG size and decode cost)."""
    from multiprocessing import Pool

    jobs = [(str(p), i) for i, p in enumerate(sorted(folder.rglob("*.jpg")))]
    with Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_texture, jobs, chunksize=32)
    return sum(sizes) / max(1, len(sizes)) / 1024


def make_data(root: Path, n_test: int, n_train: int) -> dict[str, Any]:
    from mcvqa.synth import SynthConfig, synthesize

    sizes = f"{n_train} {n_test}\n"
    if (root / "test.csv").exists() and (not (root / "sizes.txt").exists() or (root / "sizes.txt").read_text() != sizes):
        shutil.rmtree(root)  # a warm machine keeps another script's set (stack.py's 400 questions): never time on it
    if not (root / "test.csv").exists():
        synthesize(root, SynthConfig(train=n_train, test=n_test, size=(720, 540), option_order="random", seed=7))
        kb = textured_photos(root)
        (root / "photo_kb.txt").write_text(f"{kb:.1f}\n")
        (root / "sizes.txt").write_text(sizes)
    import pandas as pd

    test = pd.read_csv(root / "test.csv")
    for n in (200, 1000):
        test.iloc[:n].to_csv(root / f"test_{n}.csv", index=False)
    return {"photo_kb": float((root / "photo_kb.txt").read_text())}


TEARDOWN_ENTRY = ["-c", "import sys; sys.argv[0] = 'mcvqa'; from mcvqa.cli import main; main()"]
"""The command as it ended before ``mcvqa.cli.run``: ``main`` alone, then the interpreter's own teardown."""


def cli(args: list[str], env_extra: dict[str, str] | None = None, entry: list[str] | None = None) -> tuple[float, str]:
    """Run ``python -m mcvqa ...`` (or ``python <entry> ...``) and return (wall seconds from process start, stderr tail)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, *(entry or ["-m", "mcvqa"]), *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        err = r.stderr
        keep = Path(os.environ.get("OUT", "bench_out")) / f"failed_{time.strftime('%H%M%S')}.stderr"
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(err)  # the whole story: a CUDA error's message sits between the traceback and the C++ frames
        at = err.find("Traceback (most recent call last)")  # the Python error first: a crash at exit buries it in frames
        shown = err[-3000:] if at < 0 or len(err) <= 3000 else err[at:at + 2200] + "\n...\n" + err[-800:]
        raise RuntimeError(f"mcvqa {' '.join(args)} failed ({r.returncode}):\n{shown}")
    return wall, r.stderr[-400:]


def after_scoring(wall: float, summary: dict[str, Any]) -> float | None:
    """Seconds of a command's wall after its scoring: the outputs written, then the process's end (its teardown)."""
    t = summary.get("timeline") or {}
    parts = [t.get(k) for k in ("process_start_to_predict", "read", "load", "score")]
    return None if any(p is None for p in parts) else round(wall - sum(parts), 2)


def in_run_rate(summary: dict[str, Any]) -> float | None:
    """Questions per second after the first batch, from a run's own timeline (predict_summary.json)."""
    t, bs = summary.get("timeline") or {}, summary.get("batch_size_used") or summary.get("batch_size") or 0
    if not t.get("score") or t.get("first_batch") is None:
        return None
    return round((summary["questions"] - bs) / (t["score"] - t["first_batch"]), 2)


ADAPTER = Path("/tmp/q8b_adapter")
VARIANTS = {"packed": ["--set", "predict.unpack_4bit=off"], "adapter": ["--adapter", str(ADAPTER)],
            "adapter_unmerged": ["--adapter", str(ADAPTER), "--set", "predict.merge_adapter=off"], "teardown": [],
            "rowsoff": ["--set", "predict.prefix_rows=false"], "lateloader": ["--set", "predict.early_loader=false"]}
"""``--quants`` entries may name a variant after a colon (``nf4:packed``): extra CLI settings for that row. ``adapter``
is the command a user runs after training (``--adapter runs/seed/best``), on :func:`make_adapter`'s adapter;
``teardown`` the same command entered as before ``mcvqa.cli.run`` (:data:`TEARDOWN_ENTRY`); ``rowsoff`` with the cached
prefix concatenated in every layer again (``predict.prefix_rows=false``); ``lateloader`` with the loader's workers started
after the weights load, as before the thirteenth session (``predict.early_loader=false``)."""


def make_adapter(model: Path, out: Path = ADAPTER) -> Path:
    """A LoRA adapter of the seed recipe's shape (r 32, rsLoRA, the language model's seven projections) with random
    weights, saved as training saves one: what ``mcvqa predict --adapter runs/seed/best`` loads. Built once."""
    if (out / "adapter_model.safetensors").exists():
        return out
    from mcvqa.config import load_config
    from mcvqa.model import attach_lora, load_model

    cfg = load_config(HERE.parent / "configs" / "seed.yaml", [f"model.name_or_path={model}", "model.quant=none", "model.kernels=off"], env=False)
    base, _ = load_model(cfg.model)
    peft_model = attach_lora(base, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter does not
                p.normal_(0, 0.01)
    peft_model.save_pretrained(str(out))
    del base, peft_model
    torch.cuda.empty_cache()
    return out


def predict_rows(model: Path, data: Path, out: Path, quant: str, tag: str, extra: list[str] | None = None,
                 entry: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    walls = {}
    for n in (200, "full"):
        csv = data / ("test.csv" if n == "full" else f"test_{n}.csv")
        run = out / f"pred_{tag}_{n}"
        wall, _ = cli(["predict", "--model", str(model), "--quant", quant, "--data", str(csv), "--out", str(run), "-q", *(extra or [])], entry=entry)
        summary = json.loads((run / "predict_summary.json").read_text())
        walls[n] = (wall, summary["questions"], summary)
    (w_small, n_small, _), (w_full, n_full, s_full) = walls[200], walls["full"]
    steady = (n_full - n_small) / (w_full - w_small)
    rows.append({"setting": tag, "path": f"mcvqa predict, {n_full} questions (CLI, from process start)", "seconds": round(w_full, 1),
                 "q_per_s": n_full / w_full, "steady_q_per_s": steady, "load_seconds": s_full.get("load_seconds"),
                 "batch_size": s_full.get("batch_size_used"), "timeline": s_full.get("timeline"),
                 # Within the full run alone (no second run whose warm-up may differ): after its first batch.
                 "steady_in_run_q_per_s": in_run_rate(s_full),
                 # The command's wall less its timeline's parts: writing the outputs and the process's end.
                 "after_scoring_seconds": after_scoring(w_full, s_full)})
    log(rows[-1])
    return rows


def orders_rows(model: Path, data: Path, out: Path, quant: str, tag: str, extra: list[str] | None = None) -> list[dict[str, Any]]:
    csv, more = data / "test_1000.csv", extra or []
    plain, _ = cli(["predict", "--model", str(model), "--quant", quant, "--data", str(csv), "--out", str(out / f"o_plain_{tag}"), "-q", *more])
    small, _ = cli(["predict", "--model", str(model), "--quant", quant, "--data", str(data / "test_200.csv"), "--out", str(out / f"o_small_{tag}"), "-q", "--tta", "orders", *more])
    orders, _ = cli(["predict", "--model", str(model), "--quant", quant, "--data", str(csv), "--out", str(out / f"o_orders_{tag}"), "-q", "--tta", "orders", *more])
    summary = json.loads((out / f"o_orders_{tag}" / "predict_summary.json").read_text())
    row = {"setting": tag, "path": "mcvqa predict --tta orders vs plain, 1,000 questions", "plain_seconds": round(plain, 1), "orders_seconds": round(orders, 1),
           "orders_steady_q_per_s": 800 / (orders - small), "cost_ratio_wall": orders / plain,
           # Within the orders run alone (its load and start-up left out): after its first batch.
           "orders_in_run_q_per_s": in_run_rate(summary), "orders_timeline": summary.get("timeline")}
    log(row)
    return [row]


def reference_predict(model_dir: Path, data: Path, quant: str, tag: str, n: int) -> dict[str, Any]:
    """The reference's loop as it ran: per question, decode the photo, letterbox 512, the processor on the
    whole chat (883-token system prompt), batch-1 generate of one token, softmax of the letter scores."""
    from PIL import Image

    from mcvqa.config import ModelConfig
    from mcvqa.data import read_csv
    from mcvqa.model import load_model
    from mcvqa.scoring import letter_tokens

    reset_mem()
    t0 = time.perf_counter()
    model, processor = load_model(ModelConfig(name_or_path=str(model_dir), quant=quant))
    load = time.perf_counter() - t0
    core = model.model
    core.language_model.config._attn_implementation = "sdpa"  # transformers' own attention, as the reference ran
    core.visual.config._attn_implementation = "sdpa"
    system = bench_prompt(processor.tokenizer, 883).system
    letters = letter_tokens(processor.tokenizer)
    items = read_csv(data / "test.csv").items[:n]
    device = next(model.parameters()).device

    def letterbox(img: Image.Image, size: int = 512) -> Image.Image:
        w, h = img.size
        s = size / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
        return canvas

    def one(it: Any) -> torch.Tensor:
        img = letterbox(Image.open(it.image).convert("RGB"))
        user = f"질문: {it.question}\n선택지:\n" + "".join(f"{l}. {o}\n" for l, o in zip("abcd", it.options)) + "정답의 알파벳 하나만 답하세요."
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[img], return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
        return torch.softmax(out.scores[0][0, list(letters.target)].float(), -1)

    tokens = len(processor(text=[processor.apply_chat_template([{"role": "system", "content": [{"type": "text", "text": system}]},
                                                                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                                                               add_generation_prompt=True, tokenize=False)],
                           images=[letterbox(Image.open(items[0].image).convert("RGB"))], return_tensors="pt")["input_ids"][0])
    for it in items[:3]:
        one(it)
    sync()
    t = time.perf_counter()
    for it in items[3:]:
        one(it)
    sync()
    rate = (len(items) - 3) / (time.perf_counter() - t)
    row = {"setting": tag, "path": "reference: processor per question, batch-1 generate(1 token), 883-token system prompt",
           "steady_q_per_s": rate, "load_seconds": round(load, 1), "tokens_per_question_min": tokens, "peak_gib": round(gpu_mem(), 1)}
    log(row)
    del model
    reset_mem()
    return row


def train_rows(model: Path, data: Path, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    run = out / "train_seed"
    wall, _ = cli(["train", "--config", str(HERE.parent / "configs" / "seed.yaml"), "--model", str(model), "--data", str(data / "train.csv"),
                   "--out", str(run), "-q", "--set", "train.epochs=1", "--set", "train.eval_every=never", "--set", "train.report_to=[]",
                   "--set", "data.val_fraction=0.01"])
    m = json.loads((run / "metrics.json").read_text())
    rows.append({"setting": "nf4", "path": "mcvqa train --config configs/seed.yaml (CLI), 1 epoch", "seconds": round(wall, 1), "steps": m["steps"],
                 "samples_per_s": m.get("samples_per_second"), "steady_samples_per_s": m.get("steady_samples_per_second"),
                 "peak_gib": m.get("peak_gpu_gib")})
    log(rows[-1])
    # The plain transformers + peft QLoRA loop, as gpu_bench measures it.
    from gpu_bench import bench_train

    from mcvqa.config import load_config
    from mcvqa.data import read_csv
    from mcvqa.model import load_processor

    cfg = load_config(None, [f"model.name_or_path={model}", "model.quant=nf4", "image.mode=letterbox", "image.size=512"], env=False)
    prompt = bench_prompt(load_processor(str(model)).tokenizer, 883)
    ns = argparse.Namespace(train_runs=[("plain", 8)], train_steps=args.train_steps, profile=0)
    for r in bench_train(cfg, prompt, read_csv(data / "train.csv").items, ns, "nf4"):
        r["path"] = "reference: plain transformers + peft QLoRA step, bs 8, 883-token prompt"
        rows.append(r)
        log(r)
    return rows


def add_build_arguments(ap: argparse.ArgumentParser) -> None:
    """``--like``, ``--build``, ``--data``, ``--out``: the real checkpoint's files the random 8B is built like, where it
    is built (kept on a warm machine), the competition-like set (:func:`make_data`) and the results' folder. Every
    script of ``bench/issue26.sh`` takes these, so they share one build and one set within a call."""
    ap.add_argument("--like", type=Path, default=HERE.parent / ".fixtures" / "qwen3-vl-8b-instruct")
    ap.add_argument("--build", type=Path, default=Path("/tmp/q8b_real"))
    ap.add_argument("--data", type=Path, default=Path("/tmp/e2e_data"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(ap)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/e2e_runs"))
    ap.add_argument("--phases", default="predict,orders,reference,train")
    ap.add_argument("--quants", default="none,nf4")
    ap.add_argument("--n-test", type=int, default=3887)
    ap.add_argument("--n-train", type=int, default=480)
    ap.add_argument("--n-reference", type=int, default=120)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--json", default="e2e.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    log(info)
    results: list[dict[str, Any]] = []
    save = lambda: (args.out / args.json).write_text(json.dumps({"versions": info, "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    if not (args.build / "config.json").exists():
        from random_8b import build_random_8b

        t = time.perf_counter()
        build_random_8b(args.build, like=args.like)
        log(f"built random Qwen3-VL-8B from {args.like} in {time.perf_counter() - t:.0f}s")
    t = time.perf_counter()
    meta = make_data(args.data, args.n_test, args.n_train)
    log(f"data ready in {time.perf_counter() - t:.0f}s; photos {meta['photo_kb']:.0f} KB on average")
    results.append({"setting": "data", "path": "competition-like set", **meta, "n_test": args.n_test})
    for spec in args.quants.split(","):
        quant, _, variant = spec.partition(":")
        tag = ("bf16" if quant == "none" else quant) + (f"_{variant}" if variant else "")
        if "predict" in args.phases:
            if variant.startswith("adapter"):
                make_adapter(args.build)
            results += predict_rows(args.build, args.data, args.runs, quant, tag, VARIANTS[variant] if variant else None,
                                    TEARDOWN_ENTRY if variant == "teardown" else None)
            save()
        if "orders" in args.phases and quant == "nf4" and not variant.startswith("adapter"):
            results += orders_rows(args.build, args.data, args.runs, quant, tag, VARIANTS[variant] if variant else None)
            save()
        if variant:
            continue
        if "reference" in args.phases:
            results.append(reference_predict(args.build, args.data, quant, tag, args.n_reference))
            save()
    if "train" in args.phases:
        results += train_rows(args.build, args.data, args.runs, args)
        save()
    log("\n| setting | path | figures |\n| --- | --- | --- |")
    for r in results:
        log(f"| {r['setting']} | {r['path']} | " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k not in ("setting", "path")) + " |")


if __name__ == "__main__":
    main()
