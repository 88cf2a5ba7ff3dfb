"""Metrics on hand-checked inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mcvqa.errors import DataError
from mcvqa.evaluate import expected_calibration_error, metrics, read_labels, read_probs


def test_metrics_by_hand() -> None:
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    labels = np.array([0, 1, 2, 3])
    m = metrics(probs, labels)
    assert m["accuracy"] == 0.5
    assert m["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert m["predicted_distribution"] == {"a": 0.75, "b": 0.25, "c": 0.0, "d": 0.0}
    assert m["accuracy_by_answer"] == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0}
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.2, 0.25])))


def test_ece_zero_when_confidence_matches_accuracy() -> None:
    probs = np.array([[1.0, 0, 0, 0]] * 4)
    assert expected_calibration_error(probs, np.zeros(4, dtype=int)) == 0.0
    assert expected_calibration_error(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.5)


def test_readers_validate(tmp_path) -> None:
    pd.DataFrame({"id": ["a", "b"], "p_a": [1, 0], "p_b": [1, 2], "p_c": [0, 0], "p_d": [0, 0]}).to_csv(tmp_path / "p.csv", index=False)
    df = read_probs(tmp_path / "p.csv")
    np.testing.assert_allclose(df[["p_a", "p_b"]].to_numpy(), [[0.5, 0.5], [0, 1]])
    (tmp_path / "l.csv").write_text("id,answer\na,a\nb,x\n")
    with pytest.raises(DataError, match="row 2, column answer: answer 'x' is not one of a, b, c, d"):
        read_labels(tmp_path / "l.csv")
    (tmp_path / "bad.csv").write_text("id,p_a,p_b,p_c\na,1,0,0\n")
    with pytest.raises(DataError, match="missing column p_d"):
        read_probs(tmp_path / "bad.csv")


def test_circular_eval_counts_a_question_only_if_every_order_is_right(tmp_path) -> None:
    from mcvqa.evaluate import circular_from_file

    right, wrong = [0.9, 0.1, 0.0, 0.0], [0.1, 0.9, 0.0, 0.0]
    rows = [("q1", v, *right) for v in range(4)] + [("q2", v, *(wrong if v == 3 else right)) for v in range(4)]
    pd.DataFrame(rows, columns=["id", "order", "p_a", "p_b", "p_c", "p_d"]).to_csv(tmp_path / "per_order.csv", index=False)
    assert circular_from_file(tmp_path / "per_order.csv", {"q1": 0, "q2": 0}) == 0.5
    assert circular_from_file(tmp_path / "per_order.csv", {"q1": 0}) == 1.0  # unlabelled ids are left out
