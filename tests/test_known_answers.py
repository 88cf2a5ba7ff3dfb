"""Tests that fail when an answer is wrong.

A tiny Qwen3-VL is trained here, through ``mcvqa train`` with the demo recipe, on questions whose answer the
picture decides (the colour of a shape; four fixed options in vocabulary order). It reaches ~99% on held-out
questions in under a minute on 2 cores, so its answers are known in advance: the labels. A wrong letter map,
rows reversed inside a batch, an answer read at the wrong position or a probability column out of place
each drop the accuracy of some scoring path to chance or below, and these tests go red (docs/testing.md).
This module is also "the demo's accuracy as part of the suite".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli as run
from mcvqa.cli import main

REPO = Path(__file__).resolve().parents[1]
LETTERS = np.array(list("abcd"))
COLS = ["p_a", "p_b", "p_c", "p_d"]

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """data/ (train, test, test_labels), model/ (random tiny) and run/best (trained): the known-answer model."""
    import contextlib
    import io

    from mcvqa.synth import SynthConfig, synthesize
    from mcvqa.tiny import build_tiny

    root = tmp_path_factory.mktemp("known")
    synthesize(root / "data", SynthConfig(train=1000, test=160, seed=11, kinds=["colour"], values=4))
    build_tiny(root / "model")
    argv = ["train", "--config", str(REPO / "configs" / "demo.yaml"), "--model", str(root / "model"), "--data", str(root / "data" / "train.csv"),
            "--out", str(root / "run"), "--epochs", "4", "--lr", "1e-3", "--set", "train.report_to=[]", "-q"]
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    assert (e.value.code or 0) == 0
    return {"data": root / "data", "model": root / "run" / "best", "base": root / "model", "root": root}


def labels(known) -> pd.Series:
    return pd.read_csv(known["data"] / "test_labels.csv").set_index("id")["answer"]


def predict(capsys, known, out: Path, *extra: str, data: Path | None = None) -> pd.DataFrame:
    """Run ``mcvqa predict`` and check the outputs agree with each other: probs.csv's highest column is the
    submission's letter, every row sums to 1, ids in the test CSV's order."""
    data = data or known["data"] / "test.csv"
    code, _, err = run(["predict", "--model", str(known["model"]), "--data", str(data), "--out", str(out), "-q", *extra], capsys)
    assert code == 0, err
    sub = pd.read_csv(out / "submission.csv")
    probs = pd.read_csv(out / "probs.csv")
    assert sub["id"].tolist() == pd.read_csv(data)["id"].tolist() == probs["id"].tolist()
    p = probs[COLS].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert (LETTERS[p.argmax(axis=1)] == sub["answer"].to_numpy()).all()
    return probs.set_index("id")


def accuracy(probs: pd.DataFrame, truth: pd.Series) -> float:
    return float((LETTERS[probs[COLS].to_numpy().argmax(axis=1)] == truth.loc[probs.index].to_numpy()).mean())


def test_demo_model_learns_held_out_questions(known, capsys, tmp_path) -> None:
    """The demo's accuracy is part of the suite: a letter or label bug breaks `make test`, not just `make demo`."""
    probs = predict(capsys, known, tmp_path / "p")
    assert accuracy(probs, labels(known)) >= 0.9
    code, out, _ = run(["evaluate", "--pred", str(tmp_path / "p" / "probs.csv"), "--data", str(known["data"] / "test_labels.csv")], capsys)
    assert code == 0 and float(out.split("accuracy")[1].split()[0]) >= 0.9
    metrics = json.loads((known["root"] / "run" / "metrics.json").read_text())
    assert metrics["best"]["accuracy"] >= 0.9  # training's own validation, through the same scorer


# Every way of scoring a question. The first four must agree to fp32 precision with each other; all must
# give the known answers.
PATHS = {
    "batch 64": ["--batch-size", "64"],
    "batch 7 (ragged last batch)": ["--batch-size", "7"],
    "batch 1": ["--batch-size", "1"],
    "no prefix cache": ["--no-prefix-cache", "--batch-size", "16"],
    "generate": ["--scoring", "generate", "--set", "predict.max_new_tokens=1"],
    "views": ["--tta", "views"],
    "tent": ["--tta", "tent", "--set", "tta.params=norm"],
    "sar": ["--tta", "sar", "--set", "tta.params=norm"],
    "zero": ["--tta", "zero"],
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_scoring_path_gives_the_known_answers(known, capsys, tmp_path, path: str) -> None:
    probs = predict(capsys, known, tmp_path / "p", *PATHS[path])
    assert accuracy(probs, labels(known)) >= 0.9, path
    if path == "generate":  # the trained model's first token is the bare letter: every answer parses, no fallback
        assert json.loads((tmp_path / "p" / "predict_summary.json").read_text())["generate_unparsed"] == 0
    if path in ("batch 7 (ragged last batch)", "batch 1", "no prefix cache"):
        ref = predict(capsys, known, tmp_path / "ref", "--batch-size", "64")
        np.testing.assert_allclose(probs[COLS].to_numpy(), ref.loc[probs.index, COLS].to_numpy(), atol=1e-5)


def _rotations(options: list[str]) -> list[list[int]]:
    """The 4 cyclic rotations of the options sorted by text (what --tta orders is documented to score)."""
    base = sorted(range(4), key=lambda j: (options[j], j))
    return [[base[(j + s) % 4] for j in range(4)] for s in range(4)]


def test_orders_average_what_each_rotated_csv_scores(known, capsys, tmp_path) -> None:
    """--tta orders equals: score 4 rotated copies of the CSV with plain predict, map each back to option
    content, average the log-probabilities. Plain predict is pinned to the known answers above."""
    test = pd.read_csv(known["data"] / "test.csv")
    test = test.iloc[:48].reset_index(drop=True)
    (tmp_path / "d").mkdir()
    small = tmp_path / "d" / "test.csv"
    import shutil

    shutil.copytree(known["data"] / "test", tmp_path / "d" / "test")
    test.to_csv(small, index=False)
    rotated_lp = np.zeros((len(test), 4, 4))
    for s in range(4):
        perm = [_rotations([str(r[c]) for c in "abcd"])[s] for _, r in test.iterrows()]
        rot = test.copy()
        for j, c in enumerate("abcd"):
            rot[c] = [str(test.loc[i, "abcd"[perm[i][j]]]) for i in range(len(test))]
        rot.to_csv(tmp_path / "d" / f"rot{s}.csv", index=False)
        p = predict(capsys, known, tmp_path / f"r{s}", data=tmp_path / "d" / f"rot{s}.csv").loc[test["id"], COLS].to_numpy()
        for i in range(len(test)):
            for j in range(4):  # letter j showed original option perm[i][j]
                rotated_lp[i, s, perm[i][j]] = math.log(p[i, j])
    expected = np.exp(rotated_lp.mean(axis=1))
    expected /= expected.sum(axis=1, keepdims=True)
    orders = predict(capsys, known, tmp_path / "o", "--tta", "orders", data=small)
    np.testing.assert_allclose(orders.loc[test["id"], COLS].to_numpy(), expected, atol=2e-5)
    per_order = pd.read_csv(tmp_path / "o" / "per_order.csv")
    got = per_order.sort_values(["id", "order"]).groupby("id")[COLS].apply(lambda f: f.to_numpy()).loc[test["id"]]
    np.testing.assert_allclose(np.stack(got.to_list()), np.exp(rotated_lp), atol=2e-5)


def test_pride_through_the_cli_is_orders_on_its_sample_and_debiased_plain_elsewhere(known, capsys, tmp_path) -> None:
    """PriDe with the real scorer: its estimation questions get the order average, the others plain / prior."""
    plain = predict(capsys, known, tmp_path / "plain")
    orders = predict(capsys, known, tmp_path / "orders", "--tta", "orders")
    pride = predict(capsys, known, tmp_path / "pride", "--tta", "pride", "--set", "tta.pride_min=40", "--set", "tta.pride_fraction=0.1")
    summary = json.loads((tmp_path / "pride" / "predict_summary.json").read_text())
    prior = np.array(summary["tta_notes"]["prior"])
    assert summary["tta_notes"]["estimation_questions"] == 40 and abs(prior.sum() - 1) < 1e-9
    debiased = plain[COLS].to_numpy() / prior
    debiased /= debiased.sum(axis=1, keepdims=True)
    same_as_orders = np.isclose(pride[COLS].to_numpy(), orders.loc[pride.index, COLS].to_numpy(), atol=1e-5).all(axis=1)
    same_as_debiased = np.isclose(pride[COLS].to_numpy(), debiased, atol=1e-5).all(axis=1)
    assert same_as_orders.sum() >= 40 and (same_as_orders | same_as_debiased).all()
    assert same_as_debiased.sum() >= len(pride) - 40


def test_adapter_trained_on_the_model_keeps_its_answers(known, capsys, tmp_path) -> None:
    """train (LoRA on the known model) -> predict --adapter: the answers survive the adapter path."""
    code, _, err = run(["train", "--model", str(known["model"]), "--data", str(known["data"] / "train.csv"), "--out", str(tmp_path / "lora"), "-q",
                        "--config", str(REPO / "configs" / "demo.yaml"), "--set", "train.method=lora", "--set", "lora.r=4",
                        "--set", "train.max_steps=3", "--set", "train.report_to=[]", "--set", "train.eval_every=never"], capsys)
    assert code == 0, err
    probs = predict(capsys, known, tmp_path / "p", "--adapter", str(tmp_path / "lora" / "best"))
    assert accuracy(probs, labels(known)) >= 0.9
