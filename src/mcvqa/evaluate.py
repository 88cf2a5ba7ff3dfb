"""Metrics from probabilities: accuracy, per-letter accuracy, position bias, confusion, NLL, calibration."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mcvqa.config import LETTERS
from mcvqa.data import answer_index, read_table
from mcvqa.errors import DataError

PROB_COLUMNS = [f"p_{l}" for l in LETTERS]
DECIMAL_COMMA = r"^(-?\d+),(\d+)$"


def _read_table(path: str | Path, expected: tuple[str, ...] = ("id",), header_hint: str | None = None) -> pd.DataFrame:
    """Any CSV the way :func:`mcvqa.data.read_table` reads it (encodings, delimiters, Excel's quirks)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file not found")
    return read_table(p, expected, header_hint).frame


def read_probs(path: str | Path) -> pd.DataFrame:
    """A ``probs.csv`` (id,p_a,p_b,p_c,p_d[,answer]) with checked, renormalised probabilities."""
    df = _read_table(path, ("id", *PROB_COLUMNS), "id,p_a,p_b,p_c,p_d (the probs.csv written by predict)")
    dup = df["id"].duplicated()
    if dup.any():
        raise DataError(path, f"duplicate id {df.loc[dup, 'id'].iloc[0]!r}", row=int(np.flatnonzero(dup.values)[0]) + 1, column="id")
    for c in PROB_COLUMNS:
        # A decimal comma ("0,25"): what a spreadsheet in many locales writes, beside a semicolon delimiter.
        vals = pd.to_numeric(df[c].str.strip().str.replace(DECIMAL_COMMA, r"\1.\2", regex=True), errors="coerce")
        bad = vals.isna() | (vals < 0) | ~np.isfinite(vals)
        if bad.any():
            r = int(np.flatnonzero(bad.values)[0])
            raise DataError(path, f"{df[c].iloc[r]!r} is not a probability", row=r + 1, column=c)
        df[c] = vals.astype(float)
    sums = df[PROB_COLUMNS].sum(axis=1)
    if (sums <= 0).any():
        r = int(np.flatnonzero((sums <= 0).values)[0])
        raise DataError(path, "probabilities sum to 0", row=r + 1)
    df[PROB_COLUMNS] = df[PROB_COLUMNS].div(sums, axis=0)
    return df


def read_labels(path: str | Path) -> dict[str, int]:
    """``id -> answer index`` from any CSV with ``id`` and ``answer`` columns (train.csv, test_labels.csv, ...)."""
    df = _read_table(path, ("id", "answer"), "id,answer (any CSV with both: train.csv, test_labels.csv, val.csv)")
    labels: dict[str, int] = {}
    for r, (rid, ans) in enumerate(zip(df["id"], df["answer"]), start=1):
        try:
            a = answer_index(ans)
        except ValueError:
            a = None
        if a is None:
            raise DataError(path, f"answer {ans!r} is not one of a, b, c, d", row=r, column="answer")
        rid = str(rid).strip()
        if rid in labels:
            raise DataError(path, f"duplicate id {rid!r}", row=r, column="id")
        labels[rid] = a
    return labels


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence with equal-width bins (Guo et al. 2017)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        out.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "accuracy": float(correct[m].mean()) if m.any() else float("nan"), "confidence": float(conf[m].mean()) if m.any() else float("nan")})
    return out


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """All the numbers ``mcvqa evaluate`` prints, as plain Python types."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    pred = probs.argmax(axis=1)
    correct = pred == labels
    p_true = np.clip(probs[np.arange(n), labels], 1e-12, 1.0)
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    per_letter = {}
    for k, l in enumerate(LETTERS):
        m = labels == k
        per_letter[l] = float(correct[m].mean()) if m.any() else float("nan")
    return {
        "n": int(n),
        "accuracy": float(correct.mean()) if n else float("nan"),
        "nll": float(-np.log(p_true).mean()) if n else float("nan"),
        "ece": expected_calibration_error(probs, labels) if n else float("nan"),
        "brier": float(((probs - np.eye(4)[labels]) ** 2).sum(axis=1).mean()) if n else float("nan"),
        "accuracy_by_answer": per_letter,
        "predicted_distribution": {l: float((pred == k).mean()) for k, l in enumerate(LETTERS)},
        "answer_distribution": {l: float((labels == k).mean()) for k, l in enumerate(LETTERS)},
        "confusion": confusion.tolist(),
        "mean_confidence": float(probs.max(axis=1).mean()) if n else float("nan"),
    }


@dataclass
class Coverage:
    """How predictions and labels overlap: only the common ids are scored, and the rest is said aloud."""

    scored: int
    unlabelled: list[str]
    """Predicted ids with no label."""
    unpredicted: list[str]
    """Labelled ids with no prediction."""

    def message(self) -> str | None:
        if not self.unlabelled and not self.unpredicted:
            return None
        parts = []
        if self.unlabelled:
            parts.append(f"{len(self.unlabelled)} prediction(s) have no label (e.g. {self.unlabelled[0]!r})")
        if self.unpredicted:
            parts.append(f"{len(self.unpredicted)} label(s) have no prediction (e.g. {self.unpredicted[0]!r})")
        return f"scoring the {self.scored} ids in common only: " + "; ".join(parts)


def align(pred: pd.DataFrame, labels: dict[str, int], pred_path: str | Path = "probs.csv") -> tuple[np.ndarray, np.ndarray, list[str], Coverage]:
    """Probabilities and labels of the ids both files have, in the predictions' order, and what was left out.

    Refuses when no id is in common (predictions of another set): that is never worth a score of nothing.
    """
    pred_ids = pred["id"].tolist()
    in_pred = set(pred_ids)
    keep = pred[pred["id"].isin(labels)]
    cov = Coverage(len(keep), [i for i in pred_ids if i not in labels], [i for i in labels if i not in in_pred])
    if keep.empty:
        example = f" (e.g. prediction {pred_ids[0]!r}, label {next(iter(labels))!r})" if pred_ids and labels else ""
        raise DataError(
            pred_path, f"no id in common with the {len(labels)} labels{example}",
            fix="evaluate the predictions against the labels of the same set",
        )
    probs = keep[PROB_COLUMNS].to_numpy(dtype=np.float64)
    y = np.array([labels[i] for i in keep["id"]], dtype=np.int64)
    return probs, y, keep["id"].tolist(), cov


def circular_from_file(path: str | Path, labels: dict[str, int]) -> float:
    """CircularEval accuracy from a ``per_order.csv``: right under every option order."""
    df = _read_table(path)
    for c in PROB_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df = df[df["id"].isin(labels)]
    pred = df[PROB_COLUMNS].to_numpy().argmax(axis=1)
    right = pd.Series(pred == df["id"].map(labels).to_numpy()).groupby(df["id"].to_numpy()).all()
    return float(right.mean())


def evaluate_files(pred: str | Path, data: str | Path) -> dict[str, Any]:
    labels = read_labels(data)
    probs, y, _, cov = align(read_probs(pred), labels, pred)
    m = metrics(probs, y)
    m["unlabelled_predictions"] = len(cov.unlabelled)
    m["unpredicted_labels"] = len(cov.unpredicted)
    if cov.message():
        warnings.warn(f"{pred}: {cov.message()}", stacklevel=2)
    per_order = Path(pred).with_name("per_order.csv")
    if per_order.exists():
        m["circular_accuracy"] = circular_from_file(per_order, labels)
    return m


def format_metrics(m: dict[str, Any], title: str = "evaluation") -> str:
    """A plain-text table (also what the rich console prints)."""
    left_out = ""
    if m.get("unlabelled_predictions") or m.get("unpredicted_labels"):
        left_out = f" in common ({m.get('unlabelled_predictions', 0)} predictions without a label, {m.get('unpredicted_labels', 0)} labels without a prediction)"
    lines = [
        f"{title}: {m['n']} questions{left_out}",
        f"  accuracy   {m['accuracy']:.4f}",
        f"  nll        {m['nll']:.4f}",
        f"  ece        {m['ece']:.4f}",
        f"  brier      {m['brier']:.4f}",
        *([f"  circular   {m['circular_accuracy']:.4f}  (right under every option order)"] if "circular_accuracy" in m else []),
        "",
        "  letter   acc|true   predicted   true",
    ]
    for l in LETTERS:
        lines.append(
            f"  {l}        {m['accuracy_by_answer'][l]:8.4f}   {m['predicted_distribution'][l]:9.3f}   {m['answer_distribution'][l]:5.3f}"
        )
    lines += ["", "  confusion (rows: true, cols: predicted)", "        " + "  ".join(f"{l:>5}" for l in LETTERS)]
    for l, row in zip(LETTERS, m["confusion"]):
        lines.append(f"  {l:>5} " + "  ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)
