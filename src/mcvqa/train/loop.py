"""One training run: LoRA / QLoRA (or full-parameter) training on the answer letter only.

Reads top to bottom as :func:`setup` -> :func:`fit` (for each epoch, :func:`train_epoch`: micro-batches ->
accumulate -> :func:`optimizer_step`; then :func:`end_epoch`: evaluate with the same scorer as ``predict`` -> keep
the best -> checkpoint) -> :func:`finish` (publish the outputs). Checkpoints live in :mod:`mcvqa.checkpoint`.
Details that matter:

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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcvqa.checkpoint import TrainState, checkpoint, latest_checkpoint, load_checkpoint, publish, read_state, save_model
from mcvqa import families
from mcvqa.config import Config
from mcvqa.data import Dataset, Item, write_items
from mcvqa.errors import McvqaError
from mcvqa.evaluate import metrics
from mcvqa.features import Collator, Encoder, resolve_num_workers, token_lengths
from mcvqa.io import recover_dir
from mcvqa.prompts import load_prompt
from mcvqa.runtime import Dist, collect_garbage, distributed, frozen_heap, progress_bar
from mcvqa.scoring import Scorer, letter_tokens
from mcvqa.train.build import build_model, fp16_scaler, make_scheduler, param_groups
from mcvqa.train.data import TrainDataset, epoch_batches
from mcvqa.train.loss import AnswerLoss, resolve_shared_prefix
from mcvqa.train.trackers import Trackers


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
    finished: bool = True
    """False when ``train.stop_after_steps`` ended the invocation before the schedule did."""


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


@dataclass
class Run:
    """What :func:`setup` builds, :func:`fit` moves forward and :func:`finish` writes out."""

    cfg: Config
    out: Path
    accelerator: Any
    dist: Dist
    """This process's rank and the world (:mod:`mcvqa.runtime`)."""
    processor: Any
    encoder: Encoder
    dataset: TrainDataset
    collator: Collator
    lengths: list[int]
    val_items: list[Item]
    loss_module: Any
    optimizer: Any
    scheduler: Any
    trackers: Trackers
    autocast_dtype: torch.dtype | None
    scaler: Any
    """``torch.amp.GradScaler``: loss scaling for fp16 (off, a pass-through, in bf16 and fp32)."""
    plan: Plan
    state: TrainState
    num_workers: int
    progress: bool
    log_fn: Callable[[str], None]
    fuse: bool = False
    """Whether the micro-batches of one optimiser step run as one pass (``train.fuse_accumulation``)."""
    samples_seen: int = 0
    steps: list[tuple[float, int]] = field(default_factory=list)
    """(seconds, samples) of each optimiser step this invocation ran, from its first micro-batch asked of the loader to
    the optimiser's step; validation and checkpoints fall between steps, not in them. The steady rate reads these."""
    clock: tuple[float, int] = (0.0, 0)
    """(time, samples seen) when the step under way began."""
    started: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.dist.main

    @property
    def model(self) -> Any:
        return self.accelerator.unwrap_model(self.loss_module).model


@dataclass(frozen=True)
class Plan:
    """The schedule, a function of the data size and the settings only (so a resumed run agrees with it)."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup: int

    @classmethod
    def of(cls, n_items: int, tc: Any, world: int) -> Plan:
        micro = math.ceil(n_items / tc.batch_size) // world
        if micro == 0:
            raise McvqaError(f"{n_items} training rows give no batch of {tc.batch_size} per process")
        per_epoch = math.ceil(micro / tc.grad_accum)
        total = max(1, math.ceil(per_epoch * tc.epochs))
        if tc.max_steps:
            total = min(total, tc.max_steps)
        return cls(micro, per_epoch, total, int(round(tc.warmup_ratio * total)))


def train_split(
    cfg: Config,
    train_ds: Dataset | Sequence[Item],
    val_items: Sequence[Item],
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train on ``train_ds``, validate on ``val_items`` each epoch, keep the best. The heart of ``mcvqa train``.

    ``on_epoch_end(epoch, validation metrics)`` is how a tuner reports and prunes (it may raise to stop).
    """
    from accelerate import Accelerator

    out.mkdir(parents=True, exist_ok=True)
    for folder in ("best", "last"):
        recover_dir(out / folder)  # a kill between the two renames of a folder swap
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise McvqaError(f"{out} already holds a training run ({ckpt.name}); pass --resume to continue it or use another --out")
    if ckpt is None and resume:
        log_fn(f"no checkpoint in {out} to resume; starting fresh")
    items = list(train_ds)
    if any(it.answer is None for it in items):
        raise McvqaError("every training row needs an answer")
    # Weights load in bf16/fp16 on GPUs; LoRA parameters stay fp32 and the autocast in the step mixes them.
    accelerator = Accelerator(cpu=_on_cpu(cfg))
    dist = distributed()  # the same process group the accelerator joined
    plan = Plan.of(len(items), cfg.train, dist.world)
    if ckpt is not None and (done := _already_finished(out, ckpt, plan, log_fn)) is not None:
        return done  # before any model is loaded
    run = setup(cfg, items, list(val_items), out, accelerator, dist, plan, ckpt, progress=progress, log_fn=log_fn)
    if fit(run, on_epoch_end):
        return finish(run)
    return _result(run, finished=False)


def _on_cpu(cfg: Config) -> bool:
    return cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available())


def _already_finished(out: Path, ckpt: Path, plan: Plan, log_fn: Callable[[str], None]) -> TrainResult | None:
    state = read_state(ckpt)
    if state.global_step < plan.total_steps or not (out / "metrics.json").exists() or not (out / "last").exists():
        return None
    log_fn(f"{out}: training already finished (step {state.global_step} of {plan.total_steps}); nothing to resume")
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return TrainResult(
        out, out / "best", saved.get("best") or {}, saved.get("history", []), float(saved.get("seconds") or 0.0),
        float(saved.get("samples_per_second") or 0.0), state.global_step,
    )


def setup(
    cfg: Config, items: list[Item], val_items: list[Item], out: Path, accelerator: Any, dist: Dist, plan: Plan, ckpt: Path | None,
    *, progress: bool, log_fn: Callable[[str], None],
) -> Run:
    """Seed, model, data, loss, optimiser, schedule, trackers; the checkpoint's state restored when resuming."""
    from accelerate.utils import set_seed

    tc = cfg.train
    cpu = accelerator.device.type == "cpu"
    set_seed(tc.seed)
    local = Path(cfg.model.name_or_path).expanduser()
    if local.is_dir() and str(local.resolve()) != cfg.model.name_or_path:
        # The adapter remembers its base model: a relative path would only resolve from today's working folder.
        cfg.model.name_or_path = str(local.resolve())
        if dist.main:
            log_fn(f"base model {cfg.model.name_or_path} (stored in the adapter as an absolute path)")
    collect_garbage()  # a process that trains again (tune's trials, k-fold's folds): the last model goes first
    model, processor = build_model(cfg, log_fn)
    family = families.for_model(model)
    encoder = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image, family, family.pixel_dtype(family.core_and_head(model)[0]))
    shared = resolve_shared_prefix(tc.shared_prefix, cfg.model.quant, cpu, encoder.family.packed, encoder.image_len())
    loss_module = AnswerLoss(model, encoder.prefix_ids, letter_tokens(processor.tokenizer).target, shared_prefix=shared)
    optimizer = torch.optim.AdamW(param_groups(loss_module, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = make_scheduler(optimizer, tc.scheduler, plan.warmup, plan.total_steps)
    # The model is already on its device (device_map at load time; moving 4-bit weights again is an error).
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer, device_placement=[False, False])
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.model.dtype)
    if not cpu and autocast_dtype is None:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = fp16_scaler(loss_module, accelerator.device.type, autocast_dtype)
    state = TrainState()
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(loss_module), optimizer, scheduler)
        if state.scaler and scaler.is_enabled():
            scaler.load_state_dict(state.scaler)
        log_fn(f"resumed from {ckpt} (step {state.global_step}, epoch {state.epoch})")
    if dist.main:
        cfg.dump(out / "config.yaml")
    return Run(
        cfg=cfg, out=out, accelerator=accelerator, dist=dist, processor=processor, encoder=encoder,
        dataset=TrainDataset(items, encoder, tc.option_shuffle, tc.seed), collator=Collator(encoder, with_prefix=shared == "off"),
        lengths=token_lengths(items, encoder), val_items=val_items, loss_module=loss_module, optimizer=optimizer,
        scheduler=scheduler, trackers=Trackers(tc.report_to, out, cfg, enabled=dist.main),
        autocast_dtype=autocast_dtype, scaler=scaler, plan=plan, state=state,
        # Decoding a batch of photos and running the image processor would otherwise sit between launch-bound
        # QLoRA steps (BENCHMARKS.md, "CPU: preparing one question").
        num_workers=resolve_num_workers(tc.num_workers), progress=progress, log_fn=log_fn,
        fuse=fuse_accumulation(tc.fuse_accumulation, accelerator.device),
    )


def fit(run: Run, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> bool:
    """Epochs until the schedule ends; True when it did, False when ``train.stop_after_steps`` ended this
    invocation first (a checkpoint holds where it stopped)."""
    tc, state = run.cfg.train, run.state
    stop_at = state.global_step + tc.stop_after_steps if tc.stop_after_steps else None
    bar = progress_bar(total=run.plan.total_steps, initial=state.global_step, desc="training", unit="step", disable=not run.progress or not run.main)
    run.loss_module.train()
    try:
        with frozen_heap():  # the host's full garbage collections would stall the GPU mid-step
            while state.global_step < run.plan.total_steps and state.epoch < math.ceil(tc.epochs):
                if not train_epoch(run, bar, stop_at):
                    checkpoint(run.accelerator, run.out, run.loss_module, run.optimizer, run.scheduler, state, tc.save_total_limit)
                    run.log_fn(f"stopped after {tc.stop_after_steps} steps at step {state.global_step} of {run.plan.total_steps} (train.stop_after_steps); --resume continues")
                    return False
                end_epoch(run, on_epoch_end)
    finally:
        bar.close()
    return True


def fuse_accumulation(setting: str, device: torch.device) -> bool:
    """``train.fuse_accumulation``: auto fuses on GPUs with room for batch_size x grad_accum rows (24 GiB or more)."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 24 * 2**30


def step_units(batches: list[list[int]], grad_accum: int, fuse: bool) -> list[tuple[list[int], int, int]]:
    """What each forward/backward runs: (rows, first micro-batch, micro-batches covered).

    The micro-batches of one optimiser step become one unit when ``fuse`` and they hold the same number of rows:
    the unit's mean loss is then the mean of their means, so the step's gradient is the same sum. A step whose
    micro-batches differ in size (an epoch's ragged end) keeps them apart. Micro-batch numbering is unchanged, so
    checkpoints (taken at step boundaries) resume the same whether or not the run that wrote them fused.
    """
    units: list[tuple[list[int], int, int]] = []
    for s in range(0, len(batches), grad_accum):
        group = batches[s : s + grad_accum]
        if fuse and len(group) > 1 and len({len(b) for b in group}) == 1:
            units.append(([i for b in group for i in b], s, len(group)))
        else:
            units += [(b, s + k, 1) for k, b in enumerate(group)]
    return units


def epoch_loader(run: Run, epoch: int) -> tuple[list[list[int]], list[tuple[list[int], int, int]], torch.utils.data.DataLoader]:
    """This process's micro-batches of ``epoch``, the units that run them from where the epoch stands (resume), and
    their loader."""
    tc = run.cfg.train
    world, rank = run.dist.world, run.dist.rank
    run.dataset.epoch = epoch
    batches = epoch_batches(run.lengths, tc.batch_size, tc.seed, epoch, tc.group_by_length)
    batches = batches[: len(batches) // world * world][rank::world]
    n_epochs = math.ceil(tc.epochs)
    if tc.epochs < n_epochs and epoch == n_epochs - 1:  # fractional last epoch
        batches = batches[: max(1, round(len(batches) * (tc.epochs - epoch)))]
    units = [u for u in step_units(batches, tc.grad_accum, run.fuse) if u[1] >= run.state.micro_in_epoch]
    loader = torch.utils.data.DataLoader(
        run.dataset,
        batch_sampler=[u[0] for u in units],
        collate_fn=run.collator,
        num_workers=run.num_workers,
        pin_memory=run.accelerator.device.type != "cpu",
        # Its own generator: a DataLoader draws a seed when iterated, which would shift the global RNG
        # (dropout) differently in a resumed epoch than in an uninterrupted one.
        generator=torch.Generator().manual_seed(tc.seed * 7919 + epoch),
    )
    return batches, units, loader


def train_epoch(run: Run, bar: Any, stop_at: int | None) -> bool:
    """The micro-batches of the current epoch, an optimiser step every ``grad_accum`` (fused into one pass where
    :func:`step_units` says so). False when ``stop_at`` was reached (the epoch is unfinished), True when the epoch
    or the whole schedule ended."""
    tc, state, acc = run.cfg.train, run.state, run.accelerator
    batches, units, loader = epoch_loader(run, state.epoch)
    run.clock = (time.perf_counter(), run.samples_seen)
    running: list[torch.Tensor] = []  # read once a step: a float() per micro-batch would make the host wait for each
    for batch, (_, first, covered) in zip(loader, units):
        micro = first + covered - 1  # the last micro-batch this unit runs
        last_micro = (micro + 1) % tc.grad_accum == 0 or micro + 1 == len(batches)
        with acc.no_sync(run.loss_module) if not last_micro else contextlib.nullcontext():
            with torch.autocast(device_type=acc.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
                loss, _ = run.loss_module(batch.to(acc.device))
            # Mean over the micro-batches of one optimiser step (the last step of an epoch may have fewer).
            group = tc.grad_accum if micro // tc.grad_accum < len(batches) // tc.grad_accum else len(batches) % tc.grad_accum
            acc.backward(run.scaler.scale(loss * covered / max(1, group)))
        running += [loss.detach()] * covered
        run.samples_seen += len(batch)
        state.micro_in_epoch = micro + 1
        if not last_micro:
            continue
        losses = torch.stack(running).tolist()  # the same floats float(loss) gave, one wait a step
        optimizer_step(run, sum(losses) / len(losses), bar)
        running = []
        if tc.checkpoint_every_steps and state.global_step % tc.checkpoint_every_steps == 0 and micro + 1 < len(batches):
            checkpoint(acc, run.out, run.loss_module, run.optimizer, run.scheduler, state, tc.save_total_limit)
            run.clock = (time.perf_counter(), run.samples_seen)
        if state.global_step >= run.plan.total_steps:
            return True
        if stop_at is not None and state.global_step >= stop_at:
            return False
    return True


def optimizer_step(run: Run, step_loss: float, bar: Any) -> None:
    """Unscale (fp16), clip, step, schedule, zero; then record and log the step's loss.

    Under fp16 a step whose gradients overflowed is skipped by the scaler (which then lowers its scale); the
    schedule does not advance for it, as in transformers' Trainer."""
    tc, state, scaler = run.cfg.train, run.state, run.scaler
    if tc.max_grad_norm > 0:
        scaler.unscale_(run.optimizer)
        run.accelerator.clip_grad_norm_(run.loss_module.parameters(), tc.max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(run.optimizer)
    scaler.update()
    if scaler.is_enabled():
        state.scaler = scaler.state_dict()
        if scaler.get_scale() < scale:
            state.skipped_steps += 1
    if not (scaler.is_enabled() and scaler.get_scale() < scale):
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    (began, seen), now = run.clock, time.perf_counter()
    run.steps.append((now - began, run.samples_seen - seen))
    run.clock = (now, run.samples_seen)
    state.losses.append([state.global_step, step_loss])
    lr = run.scheduler.get_last_lr()[0]
    bar.update(1)
    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
    if state.global_step % tc.log_every == 0:
        run.trackers.log({"train/loss": step_loss, "train/lr": lr}, state.global_step)


def end_epoch(run: Run, on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> None:
    """Validate with predict's scorer, keep the best adapter, log, checkpoint."""
    tc, state = run.cfg.train, run.state
    epoch = state.epoch + 1
    state.epoch, state.micro_in_epoch = epoch, 0
    entry: dict[str, Any] = {"epoch": epoch, "step": state.global_step, "train_loss": _mean_tail(state.losses, run.plan.steps_per_epoch)}
    line = f"epoch {epoch}: train loss {entry['train_loss']:.4f} (cross-entropy over the vocabulary)"
    if tc.eval_every == "epoch" and run.val_items and run.main:
        m = evaluate_split(run.model, run.encoder, run.val_items, run.cfg.predict.batch_size, run.progress)
        run.loss_module.train()
        entry.update({"val_accuracy": m["accuracy"], "val_nll": m["nll"], "val_ece": m["ece"]})
        run.trackers.log({"val/accuracy": m["accuracy"], "val/nll": m["nll"]}, state.global_step)
        line += f"  val accuracy {m['accuracy']:.4f}  val nll {m['nll']:.4f} (over a-d)"
        if _is_better(m, state.best):
            state.best = {"epoch": epoch, "step": state.global_step, "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"]}
            # Kept beside the checkpoints until the run succeeds: best/ appears with the run's other outputs.
            save_model(run.out / "checkpoints" / "best", run.model, run.processor, run.cfg, tc.method, {"best": state.best, "metrics": m})
        if on_epoch_end is not None:
            on_epoch_end(epoch, m)
    if run.main:
        run.log_fn(line)
    state.history.append(entry)
    checkpoint(run.accelerator, run.out, run.loss_module, run.optimizer, run.scheduler, state, tc.save_total_limit)


def finish(run: Run) -> TrainResult:
    """last/, best/, metrics.json and loss.png, published together (main process); trackers closed."""
    seconds = time.perf_counter() - run.started
    world = run.dist.world
    if run.main:
        summary = {
            "best": run.state.best,
            "history": run.state.history,
            "losses": run.state.losses,
            "steps": run.state.global_step,
            "seconds": round(seconds, 2),
            "samples_per_second": round(run.samples_seen * world / seconds, 3) if seconds > 0 else None,
            "steady_samples_per_second": _steady_rate(run.steps, world),
            # Each optimiser step's wall seconds in this invocation, in order (the same batches in every run of one
            # seed: two settings compare step by step, not only by their totals).
            "step_seconds": [round(seconds, 4) for seconds, _ in run.steps],
            # What the card needed at its peak (this process's allocations), for "does it fit on a smaller GPU".
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if run.accelerator.device.type == "cuda" else None,
        }
        publish(run.out, run.model, run.processor, run.cfg, run.cfg.train.method, run.state, summary)
    run.accelerator.wait_for_everyone()
    return _result(run, finished=True)


def write_held_out(out: Path, val_ds: Dataset, log_fn: Callable[[str], None]) -> Path:
    """``val.csv`` beside the run: the rows it validated on, for evaluate / report / ensemble / predict on them."""
    path = write_items(out / "val.csv", val_ds.items)
    log_fn(f"held-out rows: {path} (predict or report on them with --data-root {val_ds.root})")
    return path


def _result(run: Run, finished: bool) -> TrainResult:
    run.trackers.close()
    seconds = time.perf_counter() - run.started
    return TrainResult(
        out=run.out,
        best=run.out / "best" if finished else None,
        best_metrics=run.state.best or {},
        history=run.state.history,
        seconds=seconds,
        samples_per_second=run.samples_seen * run.dist.world / seconds if seconds > 0 else 0.0,
        steps=run.state.global_step,
        finished=finished,
    )


def _mean_tail(losses: list[list[float]], n: int) -> float:
    tail = [l for _, l in losses[-max(1, n) :]]
    return float(sum(tail) / len(tail)) if tail else float("nan")


def _steady_rate(steps: list[tuple[float, int]], world: int, skip: int = 4) -> float | None:
    """Samples/s over the optimiser steps after the first ``skip`` (allocator growth, kernel autotuning and the first
    loader batches land there), validation and checkpoints left out; None when the run is too short to tell."""
    seconds = sum(s for s, _ in steps[skip:])
    return round(sum(n for _, n in steps[skip:]) * world / seconds, 3) if seconds > 0 else None
