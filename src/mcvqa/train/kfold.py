"""K-fold training on small samples: K models on K stratified folds, mean and spread of their best accuracy."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcvqa.config import Config
from mcvqa.data import Dataset, kfold_splits
from mcvqa.io import atomic_write_json, atomic_write_text
from mcvqa.runtime import distributed
from mcvqa.train.loop import TrainResult, train_split, write_held_out


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
        if r.finished and distributed().main:
            write_held_out(fold_out, va, log_fn)
        results.append({"fold": k, **r.best_metrics})
    accs = np.array([r["accuracy"] for r in results])
    summary = {"folds": results, "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0}
    atomic_write_json(out / "kfold.json", summary)
    atomic_write_text(out / "kfold.txt", f"{cfg.train.kfold}-fold accuracy {summary['accuracy_mean']:.4f} +- {summary['accuracy_std']:.4f}\n")
    log_fn(f"{cfg.train.kfold}-fold validation accuracy: {summary['accuracy_mean']:.4f} +- {summary['accuracy_std']:.4f}")
    return TrainResult(out, None, {"accuracy": summary["accuracy_mean"], "accuracy_std": summary["accuracy_std"]}, [], time.perf_counter() - t0, 0.0, 0, folds=results)
