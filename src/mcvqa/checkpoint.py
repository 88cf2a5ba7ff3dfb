"""Training checkpoints and outputs: what ``train`` writes, how it is made crash-safe, how ``--resume`` reads it.

* ``checkpoints/step_N/``: trainable weights (safetensors), optimizer, scheduler, RNG state (no pickled objects)
  and progress; written to ``step_N.tmp`` and renamed, so a kill or a full disk never leaves a half checkpoint
  that ``--resume`` would trust.
* ``checkpoints/best/``: the best adapter so far, kept beside the checkpoints until the run succeeds.
* At the end, :func:`publish` writes ``last/``, ``best/``, ``metrics.json`` and ``loss.png`` under temporary
  names and gives them their names only once all are on disk.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcvqa.config import Config
from mcvqa.errors import McvqaError
from mcvqa.io import Staged, atomic_write_json, disk_error, disk_problem, replace_dir
from mcvqa.families import unwrap
from mcvqa.plotting import plot_loss


@dataclass
class TrainState:
    """Where a run stands, saved with every checkpoint (``trainer_state.json``) so ``--resume`` continues exactly."""

    global_step: int = 0
    """Optimiser steps taken."""
    epoch: int = 0
    """Epochs completed."""
    micro_in_epoch: int = 0
    """Micro-batches of the current epoch already trained on: the data position a resume starts from."""
    best: dict[str, Any] | None = None
    """The best validation so far (epoch, step, accuracy, nll, ece), or None."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per epoch: train loss and validation metrics."""
    losses: list[list[float]] = field(default_factory=list)
    """[step, loss] per optimiser step (loss.png)."""
    scaler: dict[str, Any] | None = None
    """fp16 loss scaler state (``torch.amp.GradScaler.state_dict``); None in bf16 and fp32."""
    skipped_steps: int = 0
    """fp16 steps the scaler skipped (inf/NaN gradients): they do not advance the schedule."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

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


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState) -> None:
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
        atomic_write_json(tmp / "trainer_state.json", {**asdict(state), "rng": plain})
    replace_dir(tmp, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> TrainState:
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
    state = read_state(path)
    _set_rng_state(json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["rng"], load_file(str(path / "rng.safetensors")))
    return state


def read_state(path: Path) -> TrainState:
    """A checkpoint's progress alone (nothing loaded into a model)."""
    return TrainState.from_json(json.loads((path / "trainer_state.json").read_text(encoding="utf-8")))


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


def publish(out: Path, model: Any, processor: Any, cfg: Config, method: str, state: TrainState, summary: dict[str, Any]) -> None:
    """The run's outputs, all at once at the end: last/, best/, metrics.json, loss.png.

    Everything is written under temporary names first; only when all of it is on disk are the names given.
    A full disk on the way leaves no final-named output and the checkpoints intact, so ``--resume`` finishes
    once there is space.
    """
    last_tmp = save_model(out / "last", model, processor, cfg, method, {"history": state.history}, publish=False)
    kept_best = out / "checkpoints" / "best"
    best_src = kept_best
    staged = Staged()
    try:
        if state.best is None or not kept_best.exists():  # no validation: the last weights are the best we know
            best_src = out / "best.tmp"
            shutil.rmtree(best_src, ignore_errors=True)
            with _cleaned_on_failure(best_src, out / "best"):
                shutil.copytree(last_tmp, best_src)
        staged.json(out / "metrics.json", summary)
        staged.file(out / "loss.png", lambda p: plot_loss(state.losses, state.history, p))
    except BaseException:
        staged.discard()
        shutil.rmtree(last_tmp, ignore_errors=True)
        if best_src != kept_best:
            shutil.rmtree(best_src, ignore_errors=True)
        raise
    replace_dir(last_tmp, out / "last")
    replace_dir(best_src, out / "best")
    staged.commit()


def checkpoint(accelerator: Any, out: Path, loss_module: Any, optimizer: Any, scheduler: Any, state: TrainState, keep: int) -> None:
    """A resumable checkpoint of this step (main process), the oldest ones beyond ``keep`` removed."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = out / "checkpoints" / f"step_{state.global_step:07d}"
        save_checkpoint(path, accelerator.unwrap_model(loss_module), optimizer, scheduler, state)
        for old in sorted((out / "checkpoints").glob("step_*[0-9]"))[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
