"""Ensembles of members scored anywhere: weights fitted on labelled questions, cross-validated, and where they disagree.

A member is one ``probs.csv``. The ensemble is the weighted mean of the members' log-probabilities, renormalised
(:func:`combine`, which the test-time methods use too); the weights are fitted to minimise the negative log-likelihood of the right
letter on a labelled set. The fit is judged by K-fold cross-validation (fit on K-1 folds, score the held-out fold)
so the reported gain is not the fit flattering itself. Members of different families make different mistakes
(FIELD-NOTES: a second family fixed 26 questions where re-seeding fixed none); :func:`disagreements` lists the
questions where members' answers differ and who was right.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcvqa.config import LETTERS
from mcvqa.errors import DataError, McvqaError

# ------------------------------------------------------------------------------------------ combining


def normalise(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities (or any log-scores) along the last axis -> probabilities summing to 1."""
    logp = logp - logp.max(axis=-1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=-1, keepdims=True)


def parse_weights(text: str | None, n_members: int) -> list[float] | None:
    """``--weights 2,1,1`` -> [2.0, 1.0, 1.0], checked: one per member, finite, non-negative, not all zero."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    weights = []
    for p in parts:
        try:
            weights.append(float(p))
        except ValueError:
            raise McvqaError(f"--weights {text!r}: {p!r} is not a number; give one number per member, e.g. --weights 2,1,1") from None
    check_weights(weights, n_members)
    return weights


def check_weights(weights: Sequence[float], n_members: int) -> None:
    if len(weights) != n_members:
        raise McvqaError(f"--weights has {len(weights)} value(s) for {n_members} member(s); give one per --probs")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise McvqaError(f"--weights: {bad[0]} is not allowed; weights must be finite and >= 0")
    if sum(weights) <= 0:
        raise McvqaError("--weights are all zero; at least one member needs a positive weight")


def combine(members: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted average of log-probabilities (a geometric mean of the members' probabilities)."""
    weights = list(weights) if weights is not None else [1.0] * len(members)
    check_weights(weights, len(members))
    total = float(sum(weights))
    logp = sum(w * np.log(np.clip(m, 1e-12, 1.0)) for w, m in zip(weights, members)) / total
    return normalise(logp)


def read_members(paths: Sequence[str | Path]) -> tuple[list[str], list[np.ndarray]]:
    """Members scored anywhere, one probs.csv each; ids must match (their order may differ). The ids of the first
    file, and each member's (N, 4) probabilities in that order."""
    from mcvqa.evaluate import PROB_COLUMNS, read_probs

    frames = [read_probs(p) for p in paths]
    ids = frames[0]["id"].tolist()
    members = []
    for p, f in zip(paths, frames):
        if set(f["id"]) != set(ids):
            missing = sorted(set(ids) ^ set(f["id"]))[0]
            raise DataError(p, f"ids differ from {paths[0]} (e.g. {missing!r})", fix="score every member on the same test CSV")
        members.append(f.set_index("id").loc[ids, PROB_COLUMNS].to_numpy(dtype=np.float64))
    return ids, members


# ------------------------------------------------------------------------------------------ fitted weights


def fit_weights(members: Sequence[np.ndarray], labels: np.ndarray, steps: int = 300) -> list[float]:
    """Simplex weights (sum 1) minimising the ensemble's NLL on ``labels``; softmax-parametrised, LBFGS."""
    logs = torch.tensor(np.stack([np.log(np.clip(m, 1e-12, 1.0)) for m in members]), dtype=torch.float64)  # (K, N, 4)
    y = torch.tensor(labels, dtype=torch.long)
    theta = torch.zeros(len(members), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = torch.softmax(theta, 0)
        logp = torch.log_softmax((w[:, None, None] * logs).sum(0), dim=-1)
        loss = torch.nn.functional.nll_loss(logp, y)
        loss.backward()
        return loss

    opt.step(closure)
    return [float(v) for v in torch.softmax(theta.detach(), 0)]


def _score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {"accuracy": float((probs.argmax(1) == labels).mean()), "nll": float(-np.log(p_true).mean())}


@dataclass
class FitReport:
    names: list[str]
    weights: list[float]
    """What to apply to the test set: the fitted weights when they beat equal weights out of fold, else equal ones."""
    members: dict[str, dict[str, float]]
    """Each member's accuracy and NLL on the labelled set."""
    equal: dict[str, float]
    """The equal-weight ensemble."""
    cv: dict[str, float]
    """Fitted weights, each fold scored by weights fitted without it."""
    folds: int
    n: int
    disagreements: int
    fold_weights: list[list[float]] = field(default_factory=list)
    fitted: list[float] = field(default_factory=list)
    """Fitted on every labelled question (kept in ``weights`` only when the fit wins out of fold)."""
    kept: str = "fitted"
    """``fitted`` or ``equal``: which weights ``weights`` holds, and so which the test set gets."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cross_validate(members: Sequence[np.ndarray], labels: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, list[list[float]]]:
    """Out-of-fold ensemble probabilities: each question scored with weights fitted on the other folds."""
    n = len(labels)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    out = np.zeros((n, 4))
    fold_weights = []
    for k in range(folds):
        held = order[k::folds]
        train = np.setdiff1d(order, held)
        w = fit_weights([m[train] for m in members], labels[train])
        fold_weights.append(w)
        out[held] = combine([m[held] for m in members], w)
    return out, fold_weights


def fit_report(names: Sequence[str], members: Sequence[np.ndarray], labels: np.ndarray, folds: int = 5, seed: int = 0) -> FitReport:
    if len(members) < 2:
        raise McvqaError("--fit-weights needs at least two --probs members")
    if len(labels) < 2 * folds:
        raise McvqaError(f"--fit-weights: {len(labels)} labelled questions are too few for {folds}-fold cross-validation; give a larger --data")
    oof, fold_weights = cross_validate(members, labels, folds, seed)
    preds = np.stack([m.argmax(1) for m in members])
    fitted = fit_weights(members, labels)
    equal, cv = _score(combine(members), labels), _score(oof, labels)
    # Equal weights fit nothing, so their in-sample score is already an out-of-fold one; the fit must beat it out of
    # fold (accuracy, then NLL) to be applied, or a few hundred labels' noise would be shipped as weights.
    wins = (cv["accuracy"], -cv["nll"]) > (equal["accuracy"], -equal["nll"])
    return FitReport(
        names=list(names),
        weights=fitted if wins else [1.0 / len(members)] * len(members),
        members={nm: _score(m, labels) for nm, m in zip(names, members)},
        equal=equal,
        cv=cv,
        folds=folds,
        n=int(len(labels)),
        disagreements=int((preds != preds[0]).any(0).sum()),
        fold_weights=fold_weights,
        fitted=fitted,
        kept="fitted" if wins else "equal",
    )


def disagreements(ids: Sequence[str], names: Sequence[str], members: Sequence[np.ndarray], combined: np.ndarray, labels: np.ndarray | None) -> list[dict[str, Any]]:
    """One row per question whose members do not all give the same letter: each member's letter, the ensemble's,
    and the answer when known."""
    preds = np.stack([m.argmax(1) for m in members])
    rows = []
    for i in np.flatnonzero((preds != preds[0]).any(0)):
        row: dict[str, Any] = {"id": ids[i]}
        row.update({nm: LETTERS[int(preds[k, i])] for k, nm in enumerate(names)})
        row["ensemble"] = LETTERS[int(combined[i].argmax())]
        if labels is not None:
            row["answer"] = LETTERS[int(labels[i])]
        rows.append(row)
    return rows


def load_weights(text: str, n_members: int) -> list[float]:
    """``--weights``: ``2,1,1`` or a ``weights.json`` written by ``--fit-weights``."""
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            weights = [float(w) for w in data["weights"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise McvqaError(f"{path}: not a weights file written by `mcvqa ensemble --fit-weights` ({e})") from None
        check_weights(weights, n_members)
        return weights
    out = parse_weights(text, n_members)
    assert out is not None
    return out


def format_report(r: FitReport) -> str:
    width = max(len(n) for n in [*r.names, "ensemble (equal weights)"])
    lines = [f"{'member':<{width}}  weight  accuracy     nll"]
    for nm, w in zip(r.names, r.fitted or r.weights):
        m = r.members[nm]
        lines.append(f"{nm:<{width}}  {w:6.3f}  {m['accuracy']:8.4f}  {m['nll']:6.4f}")
    lines.append(f"{'ensemble (equal weights)':<{width}}          {r.equal['accuracy']:8.4f}  {r.equal['nll']:6.4f}")
    lines.append(f"{'ensemble (fitted, ' + str(r.folds) + '-fold CV)':<{width}}          {r.cv['accuracy']:8.4f}  {r.cv['nll']:6.4f}")
    lines.append(f"members disagree on {r.disagreements} of {r.n} questions")
    if r.kept == "equal":
        lines.append(f"the fitted weights lose to equal weights out of fold (accuracy {r.cv['accuracy']:.4f} vs {r.equal['accuracy']:.4f}, "
                     f"nll {r.cv['nll']:.4f} vs {r.equal['nll']:.4f}): weights.json keeps equal weights")
    else:
        lines.append("the fitted weights beat equal weights out of fold: weights.json holds them")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the command


@dataclass
class EnsembleResult:
    submission: Path
    probs: Path
    disagreements: Path | None
    """``disagreements.csv``, when members gave different letters anywhere."""
    n_disagreements: int
    report: FitReport | None
    """The fit, with ``--fit-weights``."""


def run(
    probs: Sequence[Path], out: Path, weights: str | None = None, data: Path | None = None, fit: bool = False, folds: int = 5,
    names: Sequence[str] | None = None,
) -> EnsembleResult:
    """``mcvqa ensemble``: the members' ``probs.csv`` combined (in ``data``'s row order when given) into one submission,
    with the weights given, equal, or fitted on ``data``'s answers; every output written atomically."""
    import pandas as pd

    from mcvqa.data import read_csv
    from mcvqa.evaluate import read_labels
    from mcvqa.io import atomic_write_csv, atomic_write_json, check_out_dir
    from mcvqa.outputs import write_outputs

    if fit and (data is None or weights is not None):
        raise McvqaError("--fit-weights needs --data with the answers (e.g. val.csv) and no --weights")
    check_out_dir(out)
    names = list(names) if names is not None else [f"m{k + 1}" for k in range(len(probs))]
    ids, members = read_members([str(x) for x in probs])
    if data is not None:
        order = [it.id for it in read_csv(data)]
        missing = sorted(set(order) - set(ids))
        if missing:
            raise McvqaError(f"{data}: id {missing[0]!r} has no prediction in the members")
        index = {i: k for k, i in enumerate(ids)}
        members = [m[[index[i] for i in order]] for m in members]
        ids = order
    labels, report = None, None
    w = load_weights(weights, len(probs)) if weights is not None else None
    if fit:
        answers = read_labels(data)  # type: ignore[arg-type]
        labels = np.array([answers[i] for i in ids])
        report = fit_report(names, members, labels, folds)
        w = report.weights
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "weights.json", report.to_json())
    combined = combine(members, w)
    rows = disagreements(ids, names, members, combined, labels)
    listed = None
    if rows:
        out.mkdir(parents=True, exist_ok=True)
        listed = atomic_write_csv(out / "disagreements.csv", pd.DataFrame(rows))
    sub, pr = write_outputs(out, ids, combined)
    return EnsembleResult(sub, pr, listed, len(rows), report)
