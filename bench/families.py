"""Each model family at its real size (random weights), through the CLI, against plain transformers / peft (issue 18).

    python bench/families.py --families /tmp/fam/families --which Qwen3.5-9B,gemma-4-E4B-it --out "$OUT"

Per family, in one process on one GPU:

* the real architecture from the checkpoint's own ``config.json`` with random bf16 weights, saved beside its real
  tokenizer, chat template and processor files (so token counts are the real ones);
* ``mcvqa predict`` (bf16, default settings, few-shot system prompt) on ``--n-test`` and on 100 questions of
  720x540 photos, from process start: whole-command q/s and the steady rate (the difference);
* the plain batched transformers forward on the same questions and prompt: the processor on each whole
  conversation, ``model(**inputs)`` on batches of 16, the letter softmax at the last position;
* ``mcvqa train --config configs/seed.yaml`` (nf4 QLoRA) on ``--n-train`` rows, 1 epoch: samples/s and peak memory
  from ``metrics.json``;
* a plain transformers + peft QLoRA loop: nf4 load, LoRA r=32 on the language model's projections, whole
  sequences through the processor, batch 8, loss at the answer position, AdamW.

The weights are deleted after each family (the one-GPU machine has 64 GiB of disk). Writes ``families.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from e2e import cli, make_data  # noqa: E402
from gpu_bench import gpu_mem, log, reset_mem, sync, versions  # noqa: E402


def nest(images: list[Any]) -> list[Any]:
    """One list of images per conversation: what every processor accepts (Gemma 4's requires it)."""
    return [[im] for im in images]


def build_random(like: Path, out: Path, device: str) -> dict[str, Any]:
    """The checkpoint's architecture with random bf16 weights, saved with its real non-weight files."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mcvqa.tiny import LIKE_FILES

    t = time.perf_counter()
    config = AutoConfig.from_pretrained(like, local_files_only=True)
    if hasattr(config, "audio_config"):
        config.audio_config = None  # never used for images; mcvqa's own runs load it otherwise
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    for name in LIKE_FILES:
        if (like / name).is_file():
            shutil.copyfile(like / name, out / name)
    gc.collect()
    torch.cuda.empty_cache()
    return {"params_b": round(params / 1e9, 2), "build_seconds": round(time.perf_counter() - t, 1)}


def predict_cli(model: Path, data: Path, runs: Path, name: str, n_small: int) -> dict[str, Any]:
    walls = {}
    for tag, csv in (("small", data / f"test_{n_small}.csv"), ("full", data / "test.csv")):
        run = runs / f"pred_{name}_{tag}"
        shutil.rmtree(run, ignore_errors=True)  # a crashed earlier run left its journal: predict would (rightly) refuse
        wall, _ = cli(["predict", "--model", str(model), "--data", str(csv), "--out", str(run), "-q"])
        walls[tag] = (wall, json.loads((run / "predict_summary.json").read_text()))
    (ws, ss), (wf, sf) = walls["small"], walls["full"]
    return {"cli_seconds": round(wf, 1), "cli_q_per_s": sf["questions"] / wf, "cli_steady_q_per_s": (sf["questions"] - ss["questions"]) / (wf - ws),
            "load_seconds": sf.get("load_seconds"), "batch_size": sf.get("batch_size_used")}


def plain_forward(model_dir: Path, data: Path, n: int, device: str, batch: int = 16) -> dict[str, Any]:
    """The plain batched transformers forward a user would write: processor on whole conversations, left padding."""
    from PIL import Image

    from mcvqa.config import ImageConfig
    from mcvqa.data import read_csv
    from mcvqa.features import Encoder
    from mcvqa.images import letterbox
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import letter_logprobs, letter_tokens
    from mcvqa import families
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reset_mem()
    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": device}).eval()
    load = time.perf_counter() - t0
    family = families.for_model(model)
    enc = Encoder(processor, load_prompt("fewshot_ko"), ImageConfig(), family)  # only for the conversation text
    letters = letter_tokens(processor.tokenizer)
    processor.tokenizer.padding_side = "left"
    items = read_csv(data / "test.csv").items[:n]

    def run(chunk: list[Any]) -> torch.Tensor:
        images = [letterbox(Image.open(it.image).convert("RGB"), 512) for it in chunk]
        inputs = processor(text=[enc.full_text(it) for it in chunk], images=nest(images), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        return letter_logprobs(logits[:, letters.all_ids], letters).exp()

    run(items[:batch])
    sync()
    t = time.perf_counter()
    done = 0
    for s in range(batch, len(items), batch):
        run(items[s : s + batch])
        done += len(items[s : s + batch])
    sync()
    row = {"plain_q_per_s": done / (time.perf_counter() - t), "plain_load_seconds": round(load, 1), "plain_peak_gib": round(gpu_mem(), 1)}
    reset_mem()
    return row


def train_cli(model: Path, data: Path, runs: Path, name: str, quant: str) -> dict[str, Any]:
    run = runs / f"train_{name}"
    shutil.rmtree(run, ignore_errors=True)
    wall, _ = cli(["train", "--config", str(HERE.parent / "configs" / "seed.yaml"), "--model", str(model), "--data", str(data / "train.csv"),
                   "--out", str(run), "-q", "--set", "train.epochs=1", "--set", "train.eval_every=never", "--set", "train.report_to=[]",
                   "--set", "data.val_fraction=0.01", "--set", f"model.quant={quant}"])
    m = json.loads((run / "metrics.json").read_text())
    return {"train_cli_seconds": round(wall, 1), "train_samples_per_s": m.get("samples_per_second"),
            "train_steady_samples_per_s": m.get("steady_samples_per_second"), "train_peak_gib": m.get("peak_gpu_gib")}


def plain_peft(model_dir: Path, data: Path, steps: int, quant: str, device: str, batch: int = 8) -> dict[str, Any]:
    """The plain QLoRA loop: nf4 + peft LoRA r=32 on the language model, whole sequences, loss at the answer."""
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from mcvqa import families
    from mcvqa.config import ImageConfig
    from mcvqa.data import read_csv
    from mcvqa.features import Encoder
    from mcvqa.images import letterbox
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import letter_tokens

    reset_mem()
    processor = AutoProcessor.from_pretrained(model_dir)
    probe = families.for_config(__import__("transformers").AutoConfig.from_pretrained(model_dir))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(probe.skip_quant)) if quant == "nf4" else None
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=q, device_map={"": device})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *probe.extra_lora_targets]
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, use_rslora=True,
                                             target_modules=r".*language_model.*\.(" + "|".join(names) + r")$"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    enc = Encoder(processor, load_prompt("fewshot_ko"), ImageConfig(), families.for_model(model))
    target = letter_tokens(processor.tokenizer).target
    processor.tokenizer.padding_side = "left"
    items = read_csv(data / "train.csv").items

    def step(chunk: list[Any]) -> None:
        images = [letterbox(Image.open(it.image).convert("RGB"), 512) for it in chunk]
        inputs = processor(text=[enc.full_text(it) for it in chunk], images=nest(images), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        y = torch.tensor([target[it.answer] for it in chunk], device=device)
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    while True:  # the plain loop at batch 8, halved until it fits (a user would do the same)
        try:
            step(items[:batch])
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            reset_mem()
            if batch == 1:
                raise
            batch //= 2
    sync()
    t = time.perf_counter()
    for s in range(1, steps + 1):  # around the set again where it is short (a --tiny dry run)
        step([items[(s * batch + j) % len(items)] for j in range(batch)])
    sync()
    row = {"plain_train_samples_per_s": steps * batch / (time.perf_counter() - t), "plain_train_peak_gib": round(gpu_mem(), 1), "plain_train_batch": batch}
    reset_mem()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", type=Path, required=True, help="Folder holding the checkpoints' non-weight files (families.tar.xz unpacked).")
    ap.add_argument("--which", default="Qwen3.5-9B,gemma-4-E4B-it,InternVL3_5-8B-HF,llava-onevision-qwen2-7b-ov-hf")
    ap.add_argument("--phases", default="predict,plain,train,peft")
    ap.add_argument("--data", type=Path, default=Path("/tmp/fam_data"))
    ap.add_argument("--runs", type=Path, default=Path("/tmp/fam_runs"))
    ap.add_argument("--build", type=Path, default=Path("/tmp/fam_model"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--n-small", type=int, default=100)
    ap.add_argument("--n-plain", type=int, default=160)
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--peft-steps", type=int, default=6)
    ap.add_argument("--json", default="families.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--train-quant", default="nf4")
    ap.add_argument("--tiny", action="store_true", help="Dry run: tiny models (mcvqa tiny --like) instead of the real sizes.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    log(info)
    results: list[dict[str, Any]] = []
    save = lambda: (args.out / args.json).write_text(json.dumps({"versions": info, "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    meta = make_data(args.data, args.n_test, args.n_train)
    import pandas as pd

    pd.read_csv(args.data / "test.csv").head(args.n_small).to_csv(args.data / f"test_{args.n_small}.csv", index=False)
    log(f"data ready; photos {meta['photo_kb']:.0f} KB")
    for spec in args.which.split(","):
        name, _, only = spec.partition(":")  # NAME:plain+train runs only those phases for that family
        phases = only.replace("+", ",") if only else args.phases
        row: dict[str, Any] = {"family": name, "phases": phases}
        results.append(row)
        try:
            shutil.rmtree(args.build, ignore_errors=True)
            if args.tiny:
                from mcvqa.tiny import build_tiny_like

                build_tiny_like(args.families / name, args.build)
            else:
                row.update(build_random(args.families / name, args.build, args.device))
            log(row)
            if "predict" in phases:
                row.update(predict_cli(args.build, args.data, args.runs, name, args.n_small))
                log(row)
                save()
            if "plain" in phases:
                row.update(plain_forward(args.build, args.data, args.n_plain, args.device))
                log(row)
                save()
            if "train" in phases:
                row.update(train_cli(args.build, args.data, args.runs, name, args.train_quant))
                log(row)
                save()
            if "peft" in phases:
                row.update(plain_peft(args.build, args.data, args.peft_steps, args.train_quant, args.device))
                log(row)
        except Exception as e:  # keep the other families' figures; say what failed
            row["error"] = f"{type(e).__name__}: {str(e)[:3500]}"
            log(row)
        finally:
            shutil.rmtree(args.build, ignore_errors=True)
            save()


if __name__ == "__main__":
    main()
