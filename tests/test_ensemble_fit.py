"""Fitted ensemble weights: they find the informative member, and cross-validation scores held-out folds only."""

from __future__ import annotations

import numpy as np
import pytest

from mcvqa.ensemble import cross_validate, disagreements, fit_report, fit_weights


def _members(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    good = np.full((n, 4), 0.1)
    good[np.arange(n), labels] = 0.7  # right 100% of the time, 70% sure
    flip = rng.random(n) < 0.3
    good[flip] = np.roll(good[flip], 1, axis=1)  # ... except 30% of questions, confidently wrong
    noise = rng.dirichlet(np.ones(4), n)  # knows nothing
    return labels, good, noise


def test_fit_puts_the_weight_on_the_informative_member() -> None:
    labels, good, noise = _members()
    w = fit_weights([noise, good], labels)
    assert abs(sum(w) - 1) < 1e-9 and w[1] > 0.8, w


def test_fitted_ensemble_beats_equal_weights_and_cv_is_held_out() -> None:
    labels, good, noise = _members()
    report = fit_report(["noise", "good"], [noise, good], labels, folds=5)
    assert report.cv["nll"] < report.equal["nll"]
    assert report.cv["accuracy"] >= report.members["noise"]["accuracy"]
    # Out of fold: each held-out fold is scored with weights fitted on the other folds only.
    oof, fold_weights = cross_validate([noise, good], labels, folds=5, seed=0)
    held = np.random.default_rng(0).permutation(200)[0::5]
    rest = np.setdiff1d(np.arange(200), held)
    from mcvqa.ensemble import combine as ensemble

    w0 = fit_weights([noise[rest], good[rest]], labels[rest])
    np.testing.assert_allclose(fold_weights[0], w0, atol=1e-6)
    np.testing.assert_allclose(oof[held], ensemble([noise[held], good[held]], w0), atol=1e-9)


def test_fit_refuses_too_few_questions() -> None:
    from mcvqa.errors import McvqaError

    labels, good, noise = _members(6)
    with pytest.raises(McvqaError, match="too few"):
        fit_report(["a", "b"], [noise, good], labels, folds=5)


def test_disagreements_list_exactly_the_split_questions() -> None:
    a = np.eye(4)[[0, 1, 2, 3]] * 0.9 + 0.025
    b = np.eye(4)[[0, 2, 2, 1]] * 0.9 + 0.025
    rows = disagreements(["q0", "q1", "q2", "q3"], ["A", "B"], [a, b], (a + b) / 2, np.array([0, 2, 2, 3]))
    assert [r["id"] for r in rows] == ["q1", "q3"]
    assert rows[0] == {"id": "q1", "A": "b", "B": "c", "ensemble": rows[0]["ensemble"], "answer": "c"}


def test_ensemble_of_identical_members_equals_one_member() -> None:
    from mcvqa.ensemble import combine

    p = np.random.default_rng(1).dirichlet(np.ones(4), size=10)
    np.testing.assert_allclose(combine([p, p, p], [1, 2, 3]), p, atol=1e-12)
    q = np.random.default_rng(2).dirichlet(np.ones(4), size=10)
    np.testing.assert_allclose(combine([p, q], [1, 0]), p, atol=1e-12)


def test_members_are_read_in_the_first_files_id_order(tmp_path) -> None:
    import pandas as pd

    from mcvqa.ensemble import read_members

    p = np.random.default_rng(3).dirichlet(np.ones(4), size=5)
    ids = [f"t{i}" for i in range(5)]
    df = pd.DataFrame({"id": ids, **{f"p_{l}": p[:, k] for k, l in enumerate("abcd")}})
    df.to_csv(tmp_path / "a.csv", index=False)
    df.iloc[::-1].to_csv(tmp_path / "b.csv", index=False)  # same member, rows in another order
    got_ids, members = read_members([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert got_ids == ids
    for m in members:
        np.testing.assert_allclose(m, p, atol=1e-9)
