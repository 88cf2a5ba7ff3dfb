"""``mcvqa train``: LoRA / QLoRA (or full-parameter) training on the answer letter only.

The loop reads top to bottom: setup -> for each epoch: micro-batches -> accumulate -> step -> evaluate
with the same scorer as ``predict`` -> keep the best -> checkpoint. Details that matter:

* Loss: cross-entropy of the bare answer letter at the answer position only; the LM head runs on B rows,
  never on B x sequence (the full logits of an 8B model at bs 8 x 1,500 tokens would be ~7 GB).
* Shared prefix: the system prompt is run once per micro-batch (batch 1, with grad) and broadcast as a
  read-only key/value prefix to every row; exact, since a causal prefix does not depend on what follows.
* Determinism: batch order, option shuffles and dropout derive from (seed, epoch, index) and saved RNG
  state, so a run resumed from a checkpoint ends with the same adapter as an uninterrupted one.
* Distributed: under ``accelerate launch`` each process takes every world-th batch; gradients are
  averaged by DDP (the loss module is what DDP wraps, so its forward hooks run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mcvqa.config import Config
from mcvqa.data import Dataset, Item, kfold_splits, read_csv, stratified_split
from mcvqa.errors import McvqaError
from mcvqa.evaluate import metrics
from mcvqa.features import Batch, Collator, Encoder, Example, resolve_num_workers, token_lengths
from mcvqa.io import Staged, atomic_write_json, atomic_write_text, disk_error, disk_problem, recover_dir, replace_dir
from mcvqa.prompts import load_prompt
from mcvqa.scoring import (
    Scorer,
    allow_prefix_cache_under_checkpointing,
    answer_hidden,
    compute_prefix,
    core_and_head,
    letter_tokens,
    packed_answer_hidden,
    unwrap,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ data


class TrainDataset(torch.utils.data.Dataset):
    """Items encoded on demand, with an optional per-epoch option shuffle that is a pure function of
    (seed, epoch, index) - the same whichever worker or resumed process draws it."""

    def __init__(self, items: Sequence[Item], encoder: Encoder, shuffle_options: bool, seed: int) -> None:
        self.items = list(items)
        self.encoder = encoder
        self.shuffle_options = shuffle_options
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int) -> Item:
        it = self.items[i]
        if self.shuffle_options:
            rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
            order = list(range(4))
            rng.shuffle(order)
            it = it.permuted(order)
        return it

    def __getitem__(self, i: int) -> Example:
        return self.encoder.encode(self.item(i))


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The epoch's batches: shuffled; with grouping, sorted by length inside chunks of 64 batches and the
    batch order shuffled again, so padding shrinks while the data order stays random."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        mega = batch_size * 64
        idx = [j for s in range(0, len(idx), mega) for j in sorted(idx[s : s + mega], key=lambda j: -lengths[j])]
    batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------------ loss module


class AnswerLoss(torch.nn.Module):
    """The training forward as one module, so DDP/FSDP wrap it and see every parameter it uses.

    ``shared_prefix``: ``packed`` (prefix + rows in one pass, see ``scoring.packed_answer_hidden``),
    ``cache`` (prefix pass, then rows reading its keys/values) or ``off`` (batch rows carry the prefix).
    """

    def __init__(self, model: Any, prefix_ids: Sequence[int], target_ids: Sequence[int], shared_prefix: str = "packed") -> None:
        super().__init__()
        if shared_prefix not in ("packed", "cache", "off"):
            raise ValueError(f"shared_prefix must be packed, cache or off, got {shared_prefix!r}")
        self.model = model
        self.prefix_ids = list(prefix_ids)
        # On the model's device: DDP broadcasts every buffer at wrap time, and NCCL has no CPU backend.
        device = model.get_input_embeddings().weight.device
        self.register_buffer("target_ids", torch.tensor(list(target_ids), dtype=torch.long, device=device), persistent=False)
        self.shared_prefix = shared_prefix

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, (B, V) logits at the answer position)."""
        _, head = core_and_head(self.model)
        device = batch.input_ids.device
        if batch.prefix_len or self.shared_prefix == "off":
            hidden = answer_hidden(self.model, batch, None)
        elif self.shared_prefix == "packed":
            hidden = packed_answer_hidden(self.model, batch, self.prefix_ids)
        else:
            hidden = answer_hidden(self.model, batch, compute_prefix(self.model, self.prefix_ids, device))
        logits = head(hidden).float()
        assert batch.labels is not None
        loss = F.cross_entropy(logits, self.target_ids.to(device)[batch.labels.to(device)])
        return loss, logits


# ------------------------------------------------------------------------------------------ setup


def build_model(cfg: Config, log_fn: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """Model + processor ready to train: LoRA attached (QLoRA with nf4) or every weight trainable.

    ``model.backend: auto`` is transformers + peft; Unsloth only when asked for (and said so), never because it
    happens to be installed.
    """
    from mcvqa.model import attach_lora, load_model

    if cfg.model.backend == "unsloth" and cfg.train.method == "lora":
        if not _unsloth_available():
            raise McvqaError("model.backend=unsloth needs a CUDA GPU and the unsloth package; use model.backend=peft")
        if log_fn is not None:
            log_fn("backend: Unsloth (model.backend=unsloth)")
        return _build_unsloth(cfg)
    model, processor = load_model(cfg.model)
    if cfg.train.method == "lora":
        model = attach_lora(model, cfg.lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        unwrap(model).activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=cfg.train.checkpoint_every_n_layers
        )
        if cfg.train.method == "lora":
            # Non-reentrant checkpointing needs no grad on the inputs, but peft models expect it set up.
            unwrap(model).enable_input_require_grads()
    allow_prefix_cache_under_checkpointing(model)
    return model, processor


def _unsloth_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def _build_unsloth(cfg: Config) -> tuple[Any, Any]:  # pragma: no cover - needs a GPU and unsloth
    """The reference's backend: Unsloth's patched Qwen3-VL with its LoRA; same data, prompts and scoring."""
    from unsloth import FastVisionModel

    from mcvqa.model import load_processor

    model, _ = FastVisionModel.from_pretrained(
        cfg.model.name_or_path,
        load_in_4bit=cfg.model.quant == "nf4",
        use_gradient_checkpointing="unsloth" if cfg.train.gradient_checkpointing else False,
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=cfg.lora.vision,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        use_rslora=cfg.lora.use_rslora,
        random_state=cfg.train.seed,
    )
    allow_prefix_cache_under_checkpointing(model)
    return model, load_processor(cfg.model.name_or_path, cfg.model.trust_remote_code)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    return get_constant_schedule_with_warmup(optimizer, warmup)


# ------------------------------------------------------------------------------------------ checkpoints


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """RNG state as (JSON-able, tensors): loadable later without unpickling anything."""
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def _set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = plain["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Trainable weights (safetensors), optimizer, scheduler, RNG and progress; written to a temp dir, then renamed."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _cleaned_on_failure(tmp, path):  # a full disk: the checkpoints before this one stay, --resume uses them
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        plain, tensors = _rng_state()
        save_file(tensors, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "trainer_state.json", {**state, "rng": plain})
    replace_dir(tmp, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    from mcvqa.errors import ModelError
    from mcvqa.model import check_safetensors

    try:
        for f in ("trainable.safetensors", "rng.safetensors"):
            check_safetensors(path / f)
    except ModelError as e:
        raise McvqaError(f"{e}; or delete {path} to resume from the checkpoint before it") from None
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise McvqaError(f"{path}: checkpoint does not match the model (unknown parameter {name})")
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    # weights_only: our own files, loaded without unpickling arbitrary objects.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    _set_rng_state(state.pop("rng"), load_file(str(path / "rng.safetensors")))
    return state


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step_*[0-9]")) if (out / "checkpoints").exists() else []
    ckpts = [c for c in ckpts if (c / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


def save_model(path: Path, model: Any, processor: Any, cfg: Config, method: str, extra: dict[str, Any], *, publish: bool = True) -> Path:
    """``best/`` or ``last/``: a LoRA adapter (safetensors) or a full checkpoint, with its config and metrics.

    Written into ``path.tmp`` first; with ``publish`` renamed to ``path`` at once, else left for the caller.
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _cleaned_on_failure(tmp, path):
        tmp.mkdir(parents=True)
        if method == "lora":
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            unwrap(model).save_pretrained(str(tmp), safe_serialization=True)
            processor.save_pretrained(str(tmp))
        cfg.dump(tmp / "mcvqa.yaml")
        atomic_write_json(tmp / "metrics.json", extra)
    if publish:
        replace_dir(tmp, path)
    return tmp


@contextlib.contextmanager
def _cleaned_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """A folder being written: removed if anything fails, and a full disk said in one line (the file named)."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and disk_problem(e):
            raise disk_error(e, path) from None
        raise


def publish(out: Path, model: Any, processor: Any, cfg: Config, method: str, state: dict[str, Any], summary: dict[str, Any]) -> None:
    """The run's outputs, all at once at the end: last/, best/, metrics.json, loss.png.

    Everything is written under temporary names first; only when all of it is on disk are the names given.
    A full disk on the way leaves no final-named output and the checkpoints intact, so ``--resume`` finishes
    once there is space.
    """
    last_tmp = save_model(out / "last", model, processor, cfg, method, {"history": state["history"]}, publish=False)
    kept_best = out / "checkpoints" / "best"
    best_src = kept_best
    staged = Staged()
    try:
        if state["best"] is None or not kept_best.exists():  # no validation: the last weights are the best we know
            best_src = out / "best.tmp"
            shutil.rmtree(best_src, ignore_errors=True)
            with _cleaned_on_failure(best_src, out / "best"):
                shutil.copytree(last_tmp, best_src)
        staged.json(out / "metrics.json", summary)
        staged.file(out / "loss.png", lambda p: plot_loss(state["losses"], state["history"], p))
    except BaseException:
        staged.discard()
        shutil.rmtree(last_tmp, ignore_errors=True)
        if best_src != kept_best:
            shutil.rmtree(best_src, ignore_errors=True)
        raise
    replace_dir(last_tmp, out / "last")
    replace_dir(best_src, out / "best")
    staged.commit()


# ------------------------------------------------------------------------------------------ trackers


class Trackers:
    """TensorBoard and/or Weights & Biases, behind one ``log`` call (rank 0 only)."""

    def __init__(self, report_to: Sequence[str], out: Path, cfg: Config, enabled: bool) -> None:
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "logs"))
            except ImportError:
                log.warning("tensorboard is not installed; not logging to it")
        if "wandb" in report_to:
            try:
                import wandb

                if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                    os.environ["WANDB_MODE"] = "offline"  # no key: log locally, `wandb sync` later
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mcvqa"), dir=str(out), config=cfg.to_dict(), reinit=True)
            except ImportError:
                log.warning("wandb is not installed (pip install 'mcvqa[wandb]'); not logging to it")

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    out: Path
    best: Path | None
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    samples_per_second: float
    steps: int
    folds: list[dict[str, Any]] = field(default_factory=list)


def evaluate_split(model: Any, encoder: Encoder, items: Sequence[Item], batch_size: int, progress: bool, prefix_cache: bool = True) -> dict[str, Any]:
    """Validation with the same scorer ``predict`` uses."""
    from mcvqa.engine import score_items

    was_training = model.training
    model.eval()
    scorer = Scorer(model, encoder, prefix_cache=prefix_cache)
    probs = score_items(scorer, items, batch_size, progress=progress, desc="validating")
    model.train(was_training)
    labels = np.array([it.answer for it in items])
    return metrics(probs, labels)


def _is_better(m: dict[str, Any], best: dict[str, Any] | None) -> bool:
    if best is None:
        return True
    return (m["accuracy"], -m["nll"]) > (best["accuracy"], -best["nll"])


def train_split(
    cfg: Config,
    train_ds: Dataset | Sequence[Item],
    val_items: Sequence[Item],
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train on ``train_ds``, validate on ``val_items`` each epoch, keep the best. The heart of ``mcvqa train``.

    ``stop_after_steps`` simulates an interruption (tests); ``epoch_callback(epoch, metrics)`` lets a tuner
    report and prune (it may raise to stop).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("best", "last"):
        recover_dir(out / folder)  # a kill between the two renames of a folder swap
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise McvqaError(f"{out} already holds a training run ({ckpt.name}); pass --resume to continue it or use another --out")
    if ckpt is None and resume:
        log_fn(f"no checkpoint in {out} to resume; starting fresh")
    device_cfg = cfg.model.device
    cpu = device_cfg == "cpu" or (device_cfg == "auto" and not torch.cuda.is_available())
    # Weights load in bf16/fp16 on GPUs; LoRA parameters stay fp32 and the autocast below mixes them.
    accelerator = Accelerator(cpu=cpu)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(tc.seed)

    model, processor = build_model(cfg, log_fn)
    encoder = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image)
    letters = letter_tokens(processor.tokenizer)
    items = list(train_ds)
    if any(it.answer is None for it in items):
        raise McvqaError("every training row needs an answer")
    dataset = TrainDataset(items, encoder, tc.option_shuffle, tc.seed)
    lengths = token_lengths(items, encoder)
    shared = tc.shared_prefix
    if shared == "auto":
        # Measured on an H100 (BENCHMARKS.md): packed wins with 4-bit weights (one dequantisation per layer
        # pass), the cached prefix wins with bf16 weights and on CPU.
        shared = "packed" if cfg.model.quant != "none" and not cpu else "cache"
    collator = Collator(encoder, with_prefix=shared == "off")

    loss_module = AnswerLoss(model, encoder.prefix_ids, letters.target, shared_prefix=shared)
    optimizer = torch.optim.AdamW(param_groups(loss_module, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
    micro_per_epoch = math.ceil(len(items) / tc.batch_size) // world
    if micro_per_epoch == 0:
        raise McvqaError(f"{len(items)} training rows give no batch of {tc.batch_size} per process")
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * tc.epochs))
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    warmup = int(round(tc.warmup_ratio * total_steps))
    scheduler = make_scheduler(optimizer, tc.scheduler, warmup, total_steps)
    # The model is already on its device (device_map at load time; moving 4-bit weights again is an error).
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer, device_placement=[False, False])
    trackers = Trackers(tc.report_to, out, cfg, enabled=accelerator.is_main_process)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.model.dtype)
    if not cpu and autocast_dtype is None:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    state: dict[str, Any] = {"global_step": 0, "epoch": 0, "micro_in_epoch": 0, "best": None, "history": [], "losses": []}
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(loss_module), optimizer, scheduler)
        if state["global_step"] >= total_steps and (out / "metrics.json").exists() and (out / "last").exists():
            log_fn(f"{out}: training already finished (step {state['global_step']} of {total_steps}); nothing to resume")
            trackers.close()
            saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
            return TrainResult(out, out / "best", saved.get("best") or {}, saved.get("history", []), float(saved.get("seconds") or 0.0), float(saved.get("samples_per_second") or 0.0), state["global_step"])
        log_fn(f"resumed from {ckpt} (step {state['global_step']}, epoch {state['epoch']})")
    if accelerator.is_main_process:
        cfg.dump(out / "config.yaml")

    n_epochs = math.ceil(tc.epochs)
    samples_seen, t_start = 0, time.perf_counter()
    # Decoding 8 photos and running the image processor takes ~0.1 s of one core per batch; in the main
    # process it would sit between launch-bound QLoRA steps of ~1.1 s on an H100 (BENCHMARKS.md).
    num_workers = resolve_num_workers(tc.num_workers)
    marks: list[tuple[float, int]] = []  # (time, samples) after each optimiser step, for the steady-state rate
    running: list[float] = []
    done = state["global_step"] >= total_steps
    bar = tqdm(total=total_steps, initial=state["global_step"], desc="training", unit="step", disable=not progress or not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    while not done and state["epoch"] < n_epochs:
        epoch = state["epoch"]
        dataset.epoch = epoch
        batches = epoch_batches(lengths, tc.batch_size, tc.seed, epoch, tc.group_by_length)
        batches = batches[: len(batches) // world * world][rank::world]
        if tc.epochs < n_epochs and epoch == n_epochs - 1:  # fractional last epoch
            batches = batches[: max(1, round(len(batches) * (tc.epochs - epoch)))]
        skip = state["micro_in_epoch"]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches[skip:],
            collate_fn=collator,
            num_workers=num_workers,
            pin_memory=not cpu,
            # Its own generator: a DataLoader draws a seed when iterated, which would shift the global RNG
            # (dropout) differently in a resumed epoch than in an uninterrupted one.
            generator=torch.Generator().manual_seed(tc.seed * 7919 + epoch),
        )
        micro = skip
        for batch in loader:
            batch = batch.to(accelerator.device)
            last_micro = (micro + 1) % tc.grad_accum == 0 or micro + 1 == len(batches)
            with accelerator.no_sync(loss_module) if not last_micro else contextlib.nullcontext():
                with torch.autocast(device_type=accelerator.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, _ = loss_module(batch)
                # Mean over the micro-batches of one optimiser step (the last step of an epoch may have fewer).
                group = tc.grad_accum if micro // tc.grad_accum < len(batches) // tc.grad_accum else len(batches) % tc.grad_accum
                accelerator.backward(loss / max(1, group))
            running.append(float(loss.detach()))
            samples_seen += len(batch)
            micro += 1
            state["micro_in_epoch"] = micro
            if not last_micro:
                continue
            if tc.max_grad_norm > 0:
                accelerator.clip_grad_norm_(loss_module.parameters(), tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            marks.append((time.perf_counter(), samples_seen))
            step_loss = sum(running) / len(running)
            running = []
            state["losses"].append([state["global_step"], step_loss])
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if state["global_step"] % tc.log_every == 0:
                trackers.log({"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0]}, state["global_step"])
            if tc.checkpoint_every_steps and state["global_step"] % tc.checkpoint_every_steps == 0 and micro < len(batches):
                _checkpoint(accelerator, out, loss_module, optimizer, scheduler, state, tc.save_total_limit)
            if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
                _checkpoint(accelerator, out, loss_module, optimizer, scheduler, state, tc.save_total_limit)
                bar.close()
                trackers.close()
                raise InterruptedError(f"stopped after {stop_after_steps} steps (simulated interruption)")
            if state["global_step"] >= total_steps:
                done = True
                break
        # ---- end of epoch: evaluate with predict's scorer, keep the best, checkpoint
        state["epoch"] = epoch + 1
        state["micro_in_epoch"] = 0
        entry: dict[str, Any] = {"epoch": epoch + 1, "step": state["global_step"], "train_loss": _mean_tail(state["losses"], steps_per_epoch)}
        if tc.eval_every == "epoch" and val_items and accelerator.is_main_process:
            m = evaluate_split(accelerator.unwrap_model(loss_module).model, encoder, val_items, cfg.predict.batch_size, progress)
            entry.update({"val_accuracy": m["accuracy"], "val_nll": m["nll"], "val_ece": m["ece"]})
            trackers.log({"val/accuracy": m["accuracy"], "val/nll": m["nll"]}, state["global_step"])
            log_fn(
                f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f} (cross-entropy over the vocabulary)  "
                f"val accuracy {m['accuracy']:.4f}  val nll {m['nll']:.4f} (over a-d)"
            )
            if _is_better(m, state["best"]):
                state["best"] = {"epoch": epoch + 1, "step": state["global_step"], "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"]}
                # Kept beside the checkpoints until the run succeeds: best/ appears with the run's other outputs.
                save_model(out / "checkpoints" / "best", accelerator.unwrap_model(loss_module).model, processor, cfg, tc.method, {"best": state["best"], "metrics": m})
            if epoch_callback is not None:
                epoch_callback(epoch + 1, m)
        elif accelerator.is_main_process:
            log_fn(f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f} (cross-entropy over the vocabulary)")
        state["history"].append(entry)
        _checkpoint(accelerator, out, loss_module, optimizer, scheduler, state, tc.save_total_limit)
    bar.close()
    seconds = time.perf_counter() - t_start
    unwrapped = accelerator.unwrap_model(loss_module).model
    if accelerator.is_main_process:
        summary = {
            "best": state["best"],
            "history": state["history"],
            "losses": state["losses"],
            "steps": state["global_step"],
            "seconds": round(seconds, 2),
            "samples_per_second": round(samples_seen * world / seconds, 3) if seconds > 0 else None,
            "steady_samples_per_second": _steady_rate(marks, world),
            # What the card needed at its peak (this process's allocations), for "does it fit on a smaller GPU".
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if not cpu else None,
        }
        publish(out, unwrapped, processor, cfg, tc.method, state, summary)
    trackers.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        out=out,
        best=out / "best",
        best_metrics=state["best"] or {},
        history=state["history"],
        seconds=seconds,
        samples_per_second=samples_seen * world / seconds if seconds > 0 else 0.0,
        steps=state["global_step"],
    )


def _mean_tail(losses: list[list[float]], n: int) -> float:
    tail = [l for _, l in losses[-max(1, n) :]]
    return float(sum(tail) / len(tail)) if tail else float("nan")


def _steady_rate(marks: list[tuple[float, int]], world: int, skip: int = 3) -> float | None:
    """Samples/s over the optimiser steps after the first ``skip`` (allocator growth, kernel autotuning and
    the first loader batches land there); None when the run is too short to tell."""
    if len(marks) <= skip + 1:
        return None
    (t0, n0), (t1, n1) = marks[skip], marks[-1]
    return round((n1 - n0) * world / (t1 - t0), 3) if t1 > t0 else None


def _checkpoint(accelerator: Any, out: Path, loss_module: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = out / "checkpoints" / f"step_{state['global_step']:07d}"
        save_checkpoint(path, accelerator.unwrap_model(loss_module), optimizer, scheduler, state)
        for old in sorted((out / "checkpoints").glob("step_*[0-9]"))[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def plot_loss(losses: list[list[float]], history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    from mcvqa.plotting import setup

    setup()

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if losses:
        steps, vals = zip(*losses)
        ax.plot(steps, vals, lw=1, alpha=0.5, label="train loss (per step)")
        k = max(1, len(vals) // 25)
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=2, label=f"train loss ({k}-step mean)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy of the answer letter")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    val = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:green", label="validation accuracy")
        ax2.set_ylabel("validation accuracy")
        ax2.set_ylim(0, 1.02)
        ax2.legend(loc="lower left")
    ax.legend(loc="upper right")
    ax.set_title("mcvqa train")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def train(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    *,
    val_data: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
) -> TrainResult:
    """``mcvqa train``: split (or K-fold) the labelled CSV, train, keep the best adapter."""
    out = Path(out)
    ds = read_csv(data, require_answer=True, cfg=cfg.data)
    if cfg.train.kfold:
        return train_kfold(cfg, ds, out, resume=resume, progress=progress, log_fn=log_fn)
    if val_data is not None:
        train_ds, val_ds = ds, read_csv(val_data, require_answer=True, cfg=cfg.data)
    elif cfg.train.eval_every == "never":
        train_ds, val_ds = ds, ds.subset([])
    else:
        train_ds, val_ds = stratified_split(ds, cfg.data.val_fraction, cfg.data.split_seed)
    log_fn(f"training on {len(train_ds)} questions, validating on {len(val_ds)}")
    return train_split(cfg, train_ds, val_ds.items, out, resume=resume, progress=progress, log_fn=log_fn)


def train_kfold(cfg: Config, ds: Dataset, out: Path, *, resume: bool, progress: bool, log_fn: Callable[[str], None]) -> TrainResult:
    """K models on K stratified folds; reports mean +- std of the best validation accuracy per fold."""
    folds = kfold_splits(ds, cfg.train.kfold, cfg.data.split_seed)
    results = []
    t0 = time.perf_counter()
    for k, (tr, va) in enumerate(folds):
        fold_out = out / f"fold_{k}"
        if (fold_out / "metrics.json").exists() and resume:
            saved = json.loads((fold_out / "metrics.json").read_text(encoding="utf-8"))
            results.append({"fold": k, **(saved.get("best") or {})})
            continue
        log_fn(f"fold {k + 1}/{len(folds)}: {len(tr)} train, {len(va)} validation")
        r = train_split(cfg, tr, va.items, fold_out, resume=resume, progress=progress, log_fn=log_fn)
        results.append({"fold": k, **r.best_metrics})
    accs = np.array([r["accuracy"] for r in results])
    summary = {"folds": results, "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0}
    atomic_write_json(out / "kfold.json", summary)
    atomic_write_text(out / "kfold.txt", f"{cfg.train.kfold}-fold accuracy {summary['accuracy_mean']:.4f} +- {summary['accuracy_std']:.4f}\n")
    log_fn(f"{cfg.train.kfold}-fold validation accuracy: {summary['accuracy_mean']:.4f} +- {summary['accuracy_std']:.4f}")
    return TrainResult(out, None, {"accuracy": summary["accuracy_mean"], "accuracy_std": summary["accuracy_std"]}, [], time.perf_counter() - t0, 0.0, 0, folds=results)
