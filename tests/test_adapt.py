"""Test-time methods: invariances, debiasing, and parameter hygiene of the adapting methods."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

import mcvqa.adapt as A
from mcvqa.data import read_csv
from mcvqa.scoring import Scorer


@pytest.fixture()
def items(synth_data):
    return read_csv(synth_data / "test_labels.csv").items[:8]


@pytest.fixture()
def scorer(tiny_loaded, encoder):
    return Scorer(tiny_loaded[0], encoder)


def test_order_average_is_invariant_to_the_order_options_arrive_in(scorer, items) -> None:
    base = A.order_average(scorer, items)
    for perm in ([2, 0, 3, 1], [3, 2, 1, 0]):
        shuffled = [it.permuted(perm) for it in items]
        res = A.order_average(scorer, shuffled)
        # map back to the original option positions: new option j is old option perm[j]
        back = np.zeros_like(res.probs)
        back[:, perm] = res.probs
        np.testing.assert_allclose(back, base.probs, atol=1e-5)
    assert base.per_order.shape == (len(items), 4, 4)


def test_circular_accuracy() -> None:
    per_order = np.array([[[0.9, 0.1, 0, 0]] * 4, [[0.9, 0.1, 0, 0]] * 3 + [[0.1, 0.9, 0, 0]]])
    assert A.circular_accuracy(per_order, np.array([0, 0])) == 0.5


def test_pride_removes_an_injected_letter_prior(monkeypatch, items) -> None:
    """A 'model' whose displayed-letter scores are content + a strong letter bias: PriDe recovers the content argmax."""
    rng = np.random.default_rng(0)
    items = [dataclasses.replace(items[0], id=f"q{i}", options=tuple(f"opt{i}-{j}" for j in range(4))) for i in range(200)]
    content = {it.id: rng.normal(0, 1.0, 4) for it in items}
    bias = np.log(np.array([0.7, 0.1, 0.1, 0.1]))  # the model loves "a"

    def observed(it, order):
        logits = np.array([content[it.id][order[d]] for d in range(4)]) + bias
        lp = logits - np.logaddexp.reduce(logits)
        out = np.empty(4)
        out[list(order)] = lp  # by original option
        return out

    def fake_orders(scorer, its, k=4, batch_size=16, progress=False):
        orders = np.array([A.item_orders(it, k) for it in its])
        return np.array([[observed(it, o) for o in A.item_orders(it, k)] for it in its]), orders

    def fake_plain(scorer, its, batch_size=16, progress=False):
        return A.TTAResult(np.exp(np.array([observed(it, (0, 1, 2, 3)) for it in its])), A.Cost(1, 0))

    monkeypatch.setattr(A, "score_orders", fake_orders)
    monkeypatch.setattr(A, "plain", fake_plain)
    truth = np.array([content[it.id].argmax() for it in items])
    biased = fake_plain(None, items).probs.argmax(1)
    res = A.pride(None, items, fraction=0.05, min_questions=1)
    assert (biased == truth).mean() < 0.8
    assert (res.probs.argmax(1) == truth).mean() == 1.0
    np.testing.assert_allclose(res.notes["prior"], [0.7, 0.1, 0.1, 0.1], atol=0.02)
    assert res.cost.forwards == pytest.approx(1 + 3 * 10 / 200)
    assert A.pride(None, items, fraction=0.05).notes["estimation_questions"] == 32  # the default floor


def test_ensemble_of_identical_members_equals_one_member() -> None:
    p = np.random.default_rng(1).dirichlet(np.ones(4), size=10)
    np.testing.assert_allclose(A.ensemble([p, p, p], [1, 2, 3]), p, atol=1e-12)
    q = np.random.default_rng(2).dirichlet(np.ones(4), size=10)
    mixed = A.ensemble([p, q], [1, 0])
    np.testing.assert_allclose(mixed, p, atol=1e-12)


def test_ensemble_files(tmp_path) -> None:
    import pandas as pd

    p = np.random.default_rng(3).dirichlet(np.ones(4), size=5)
    ids = [f"t{i}" for i in range(5)]
    df = pd.DataFrame({"id": ids, **{f"p_{l}": p[:, k] for k, l in enumerate("abcd")}})
    df.to_csv(tmp_path / "a.csv", index=False)
    df.iloc[::-1].to_csv(tmp_path / "b.csv", index=False)  # same member, rows in another order
    got_ids, probs = A.ensemble_files([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert got_ids == ids
    np.testing.assert_allclose(probs, p, atol=1e-9)


def test_views_are_deterministic_and_text_safe(scorer, items) -> None:
    a = A.image_views(scorer, items[:3])
    b = A.image_views(scorer, items[:3])
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.cost.forwards == 5
    assert "flip" not in " ".join(A.VIEWS)


EXPECTED = {
    "lora": r"\.lora_[AB]\.default\.weight$",
    "norm": r"\.language_model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)|norm)\.weight$",
}
"""The parameters tta.params=lora / norm may change: LoRA matrices; the language model's RMSNorm weights."""


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["tent", "sar"])
def test_weight_adapters_touch_only_what_they_claim_and_reset_exactly(tiny_model, cfg_factory, synth_data, method) -> None:
    from mcvqa.features import Encoder
    from mcvqa.model import attach_lora, load_model
    from mcvqa.prompts import load_prompt

    cfg = cfg_factory("lora.r=4", "lora.dropout=0.0")
    base, processor = load_model(cfg.model)
    model = attach_lora(base, cfg.lora)
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.eval()
    scorer = Scorer(model, Encoder(processor, load_prompt("plain_ko"), cfg.image))
    its = read_csv(synth_data / "test_labels.csv").items[:12]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for params in ("lora", "norm"):
        before = _snapshot(model)
        cls = A.Tent if method == "tent" else A.SAR
        kwargs = {"e0": 1.0, "reset_below": -1.0} if method == "sar" else {}  # adapt on every sample, never auto-reset
        adapter = cls(scorer, params=params, lr=1e-2, **kwargs)
        adapter.run(its, batch_size=4)
        # What each setting may touch, written here rather than taken from the code under test.
        allowed = {n for n in before if re.search(EXPECTED[params], n)}
        assert set(adapter.params) == allowed, (params, sorted(set(adapter.params) ^ allowed)[:3])
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= allowed, (params, sorted(changed - allowed)[:3])
        adapter.close()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), f"{n} not restored"
            assert p.requires_grad == flags[n], f"{n} trainability not restored"


def test_tent_predicts_with_pre_update_weights(scorer, items) -> None:
    """The first batch's predictions equal plain scoring: the update happens after the prediction."""
    plain = A.plain(scorer, items[:4], batch_size=4).probs
    tent = A.Tent(scorer, params="norm", lr=1e-1)
    try:
        first = tent.run(items[:4], batch_size=4).probs
    finally:
        tent.close()
    np.testing.assert_allclose(first, plain, atol=1e-6)


def test_tpt_changes_no_weight_and_cleans_up(scorer, items, tiny_loaded) -> None:
    model = tiny_loaded[0]
    plain_before = A.plain(scorer, items[:3]).probs
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    embed = scorer.model.get_input_embeddings()
    hooks_before = len(embed._forward_hooks)
    res = A.tpt(scorer, items[:3], views=("crop", "colour", "rescale"))
    assert res.probs.shape == (3, 4) and res.cost.backwards == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n]
    assert len(embed._forward_hooks) == hooks_before
    # with the soft prompt gone, scoring is back to plain
    np.testing.assert_array_equal(A.plain(scorer, items[:3]).probs, plain_before)
    assert not np.allclose(res.probs, plain_before, atol=1e-7)  # while it was there, the soft prompt did change the answer


def test_zero_votes(scorer, items) -> None:
    res = A.zero(scorer, items[:4], views=("crop", "colour", "rescale"), select=0.5)
    assert res.probs.shape == (4, 4)
    np.testing.assert_allclose(res.probs.sum(1), 1.0)


def test_run_tta_composes_and_refuses_nonsense(scorer, items, cfg_factory) -> None:
    from mcvqa.config import TTAConfig

    from mcvqa.engine import Engine

    engine = Engine(items[:4], scorer.encoder, batch_size=8, progress=False)
    res = A.run_tta(scorer, items[:4], TTAConfig(methods=["orders", "views"]), engine)
    assert res.per_order is not None and res.cost.forwards == 4 + 5
    # composed through the engine = the library functions composed by hand
    by_hand = A.ensemble([A.order_average(scorer, items[:4]).probs, A.image_views(scorer, items[:4]).probs])
    np.testing.assert_allclose(res.probs, by_hand, atol=1e-6)
    from mcvqa.errors import ConfigError

    with pytest.raises(ConfigError, match="adapts on its own"):
        TTAConfig(methods=["tent", "views"])
    with pytest.raises(ConfigError, match="choose orders or pride"):
        TTAConfig(methods=["orders", "pride"])


@pytest.fixture()
def adapted_scorer(cfg_factory, synth_data):
    """A LoRA model whose adapter changes the answers (B no longer zero), and its scorer."""
    from mcvqa.features import Encoder
    from mcvqa.model import attach_lora, load_model
    from mcvqa.prompts import load_prompt

    cfg = cfg_factory("lora.r=4", "lora.dropout=0.0")
    base, processor = load_model(cfg.model)
    model = attach_lora(base, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    return Scorer(model, Encoder(processor, load_prompt("plain_ko"), cfg.image))


def test_blend_with_base_rescores_only_the_least_confident(adapted_scorer, synth_data) -> None:
    its = read_csv(synth_data / "test_labels.csv").items[:12]
    tuned = A.plain(adapted_scorer, its, batch_size=4).probs
    with adapted_scorer.model.disable_adapter():
        adapted_scorer.invalidate()
        base = A.plain(adapted_scorer, its, batch_size=4).probs
    adapted_scorer.invalidate()
    assert not np.allclose(tuned, base, atol=1e-3)  # the adapter matters, so blending can be seen
    res = A.blend_with_base(adapted_scorer, its, fraction=0.25, weight=0.3, batch_size=4)
    unsure = set(np.argsort(tuned.max(axis=1))[:3].tolist())  # 25% of 12, by the tuned model's confidence
    for i in range(len(its)):
        if i in unsure:
            expected = np.exp(0.7 * np.log(tuned[i]) + 0.3 * np.log(base[i]))
            np.testing.assert_allclose(res.probs[i], expected / expected.sum(), atol=1e-6)
        else:
            np.testing.assert_allclose(res.probs[i], tuned[i], atol=1e-7)
    assert res.notes["blended"] == 3 and res.cost.forwards == pytest.approx(1 + 3 / 12)
    full = A.blend_with_base(adapted_scorer, its, fraction=1.0, weight=1.0, batch_size=4)
    np.testing.assert_allclose(full.probs, base, atol=1e-6)  # all rescored, all weight on the base: the base
    after = A.plain(adapted_scorer, its, batch_size=4).probs
    np.testing.assert_allclose(after, tuned, atol=1e-7)  # the adapter is back on, the prefix cache refreshed


def test_sar_filters_samples_and_resets(adapted_scorer, synth_data) -> None:
    its = read_csv(synth_data / "test_labels.csv").items[:16]
    ent = -(A.plain(adapted_scorer, its, batch_size=8).probs * np.log(A.plain(adapted_scorer, its, batch_size=8).probs)).sum(1)
    e0 = float(np.median(ent)) / np.log(4)  # half the samples below the margin, half above
    admitted: list[tuple[int, int]] = []

    class Spy(A.SAR):
        def loss(self, lp, batch):
            ent = A.entropy(lp.detach())
            reliable = ent < e0 * np.log(4)
            admitted.append((int(reliable.sum()), len(batch)))
            got = super().loss(lp, batch)
            # the loss is the mean entropy of the admitted samples only (None when none is admitted)
            if reliable.any():
                assert got is not None and float(got.detach()) == pytest.approx(float(ent[reliable].mean()), rel=1e-5)
            else:
                assert got is None
            return got

    sar = Spy(adapted_scorer, params="lora", lr=1e-3, e0=e0, reset_below=-1.0)
    before = {n: p.detach().clone() for n, p in sar.params.items()}
    sar.run(its, batch_size=8)
    first_pass = admitted[0::2]  # each batch: the loss at the weights, then at the sharpness-aware point
    assert sum(a for a, _ in first_pass) not in (0, sum(n for _, n in first_pass))  # some admitted, some rejected
    assert sar.resets == 0 and any(not torch.equal(p, before[n]) for n, p in sar.params.items())
    sar.close()
    # A reset threshold above any loss: the moving average falls under it at the first step, and it fires.
    sar = A.SAR(adapted_scorer, params="lora", lr=1e-3, e0=1.0, reset_below=10.0)
    sar.run(its, batch_size=8)
    assert sar.resets == 2  # once per batch
    assert all(torch.equal(p, before[n]) for n, p in sar.params.items())  # reset means the starting weights
    sar.close()
