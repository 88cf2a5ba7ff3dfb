"""The files a run hands in: ``submission.csv`` and ``probs.csv`` (and ``per_order.csv``), validated before a byte
is written, written together. Predict and ensemble both end here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mcvqa.config import LETTERS
from mcvqa.errors import McvqaError
from mcvqa.io import Staged


def validate_submission(df: pd.DataFrame, test_ids: Sequence[str]) -> None:
    """Every test id exactly once, in the test CSV's order, letters a-d only. Raises before anything is written."""
    if list(df.columns) != ["id", "answer"]:
        raise McvqaError(f"submission columns are {list(df.columns)}, expected ['id', 'answer']")
    ids = df["id"].tolist()
    if len(ids) != len(test_ids):
        raise McvqaError(f"submission has {len(ids)} rows for {len(test_ids)} test ids")
    if ids != list(test_ids):
        first = next(i for i, (a, b) in enumerate(zip(ids, test_ids)) if a != b)
        raise McvqaError(f"submission row {first + 1} is id {ids[first]!r}, expected {test_ids[first]!r} (same order as the test CSV)")
    bad = df.loc[~df["answer"].isin(LETTERS)]
    if len(bad):
        raise McvqaError(f"submission id {bad.iloc[0]['id']!r} has answer {bad.iloc[0]['answer']!r}, not one of a, b, c, d")


def validate_probs(probs: np.ndarray, ids: Sequence[str]) -> None:
    """Every row four finite, non-negative probabilities summing to 1: a NaN row would argmax to 'a' silently."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), 4):
        raise McvqaError(f"probabilities have shape {probs.shape} for {len(ids)} test ids; expected ({len(ids)}, 4)")
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (np.abs(probs.sum(axis=1) - 1.0) > 1e-6)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise McvqaError(
            f"probabilities of id {ids[r]!r} are {probs[r].tolist()} (not four finite non-negative numbers summing to 1); "
            "nothing was written"
        )


def write_outputs(out: Path, ids: Sequence[str], probs: np.ndarray, staged: Staged | None = None) -> tuple[Path, Path]:
    """``submission.csv`` (id,answer) and ``probs.csv`` (id,p_a..p_d,answer), validated, then written together:
    both appear, or (disk full) neither. With ``staged`` they join a larger set committed by the caller."""
    if staged is None:
        with Staged() as own:
            return write_outputs(out, ids, probs, own)
    validate_probs(probs, ids)
    answers = [LETTERS[int(k)] for k in probs.argmax(axis=1)]
    sub = pd.DataFrame({"id": list(ids), "answer": answers})
    validate_submission(sub, ids)
    pr = pd.DataFrame({"id": list(ids), **{f"p_{l}": probs[:, i] for i, l in enumerate(LETTERS)}, "answer": answers})
    probs_path = staged.csv(out / "probs.csv", pr, float_format="%.8g")
    sub_path = staged.csv(out / "submission.csv", sub)
    return sub_path, probs_path


def write_per_order(path: Path, ids: Sequence[str], per_order: np.ndarray, staged: Staged) -> Path:
    """``id,order,p_a..p_d`` for each option order scored (by original option): what CircularEval needs."""
    n, v, _ = per_order.shape
    df = pd.DataFrame(
        {"id": np.repeat(list(ids), v), "order": np.tile(np.arange(v), n), **{f"p_{l}": per_order[:, :, k].reshape(-1) for k, l in enumerate(LETTERS)}}
    )
    return staged.csv(path, df, float_format="%.8g")
