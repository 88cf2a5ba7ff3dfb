"""``mcvqa train``: LoRA / QLoRA (or full-parameter) training on the answer letter only.

:func:`train` is the command (split or K-fold the labelled CSV, train, keep the best adapter); :mod:`.loop` is one
run (setup -> fit -> finish), :mod:`.loss` the training forward, :mod:`.build` the model, optimiser groups and
schedule, :mod:`.data` the batches, :mod:`.trackers` the loggers, :mod:`.kfold` the K-fold runs. Checkpoints live in
:mod:`mcvqa.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mcvqa.config import Config
from mcvqa.data import read_csv, stratified_split
from mcvqa.runtime import distributed
from mcvqa.train.build import build_model, fp16_scaler, make_scheduler, param_groups
from mcvqa.train.data import TrainDataset, epoch_batches
from mcvqa.train.kfold import train_kfold
from mcvqa.train.loop import Run, TrainResult, fit, finish, setup, train_split, write_held_out
from mcvqa.train.loss import AnswerLoss


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
    result = train_split(cfg, train_ds, val_ds.items, out, resume=resume, progress=progress, log_fn=log_fn)
    if len(val_ds) and result.finished and distributed().main:
        write_held_out(out, val_ds, log_fn)
    return result



__all__ = [
    "AnswerLoss", "Run", "TrainDataset", "TrainResult", "build_model", "epoch_batches", "finish", "fit", "fp16_scaler",
    "make_scheduler", "param_groups", "setup", "train", "train_kfold", "train_split",
]
