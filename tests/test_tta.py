"""Test-time methods, through the composition predict runs (:func:`mcvqa.tta.run`, batch by batch through the engine):
invariances, debiasing, blending, and the parameter hygiene of the adapting methods."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from mcvqa import tta
from mcvqa.config import TTAConfig
from mcvqa.data import read_csv
from mcvqa.ensemble import combine
from mcvqa.scoring import Scorer, entropy


@pytest.fixture()
def items(synth_data):
    return read_csv(synth_data / "test_labels.csv").items[:8]


@pytest.fixture()
def scorer(tiny_loaded, encoder):
    return Scorer(tiny_loaded[0], encoder)


def run(scorer, items, *methods, batch_size=16, **fields):
    return tta.run(scorer, items, TTAConfig(methods=list(methods), **fields), batch_size=batch_size)


def test_order_average_is_invariant_to_the_order_options_arrive_in(scorer, items) -> None:
    base = run(scorer, items, "orders")
    for perm in ([2, 0, 3, 1], [3, 2, 1, 0]):
        res = run(scorer, [it.permuted(perm) for it in items], "orders")
        # map back to the original option positions: new option j is old option perm[j]
        back = np.zeros_like(res.probs)
        back[:, perm] = res.probs
        np.testing.assert_allclose(back, base.probs, atol=1e-5)
    assert base.per_order.shape == (len(items), 4, 4) and base.cost.forwards == 4


class LetterBiased:
    """A 'model' whose displayed-letter scores are content + a strong letter bias, behind the scorer's interface (the
    engine encodes the batches for real; only the forward is replaced)."""

    with_prefix_in_batch = False

    def __init__(self, encoder, content, bias) -> None:
        self.encoder, self.content, self.bias = encoder, content, bias

    def observed(self, qid, order):
        logits = np.array([self.content[qid][order[d]] for d in range(4)]) + self.bias
        out = np.empty(4)
        out[list(order)] = logits - np.logaddexp.reduce(logits)  # by original option
        return out

    def logprobs(self, batch, grad=False):
        return torch.tensor(np.array([self.observed(i, (0, 1, 2, 3)) for i in batch.ids]))

    def logprobs_orders(self, examples, grad=False):
        return torch.tensor(np.array([[self.observed(ex.id, o) for o in ex.orders] for ex in examples]))


def test_pride_removes_an_injected_letter_prior(encoder, items) -> None:
    rng = np.random.default_rng(0)
    items = [dataclasses.replace(items[0], id=f"q{i}", options=tuple(f"opt{i}-{j}" for j in range(4))) for i in range(200)]
    content = {it.id: rng.normal(0, 1.0, 4) for it in items}
    model = LetterBiased(encoder, content, np.log(np.array([0.7, 0.1, 0.1, 0.1])))  # the model loves "a"
    truth = np.array([content[it.id].argmax() for it in items])
    biased = run(model, items).probs.argmax(1)
    res = run(model, items, "pride", pride_fraction=0.05, pride_min=1, batch_size=50)
    assert (biased == truth).mean() < 0.8
    assert (res.probs.argmax(1) == truth).mean() == 1.0
    np.testing.assert_allclose(res.notes["prior"], [0.7, 0.1, 0.1, 0.1], atol=0.02)
    assert res.notes["estimation_questions"] == 10 and res.cost.forwards == pytest.approx(1 + 3 * 10 / 200)
    assert run(model, items[:64], "pride", batch_size=64).notes["estimation_questions"] == 32  # the default floor


def test_views_are_deterministic_and_text_safe(scorer, items) -> None:
    a, b = run(scorer, items[:3], "views"), run(scorer, items[:3], "views")
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.cost.forwards == 5 and not np.allclose(a.probs, run(scorer, items[:3]).probs, atol=1e-6)
    assert "flip" not in " ".join(tta.VIEWS)


EXPECTED = {
    "lora": r"\.lora_[AB]\.default\.weight$",
    "norm": r"\.language_model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)|norm)\.weight$",
}
"""The parameters tta.params=lora / norm may change: LoRA matrices; the language model's RMSNorm weights."""


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _adapted(cfg_factory, scale: float):
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
                p.normal_(0, scale)
    model.eval()
    return Scorer(model, Encoder(processor, load_prompt("plain_ko"), cfg.image))


@pytest.fixture()
def adapted_scorer(cfg_factory):
    return _adapted(cfg_factory, 0.5)


def _batches(scorer, its, size):
    """The questions as the engine hands them to TENT and SAR: images loaded, ``size`` a batch."""
    loaded = [scorer.encoder.load(it) for it in its]
    return [loaded[s : s + size] for s in range(0, len(loaded), size)]


@pytest.mark.parametrize("method", ["tent", "sar"])
def test_weight_adapters_touch_only_what_they_claim_and_reset_exactly(cfg_factory, synth_data, method) -> None:
    scorer = _adapted(cfg_factory, 0.02)
    model = scorer.model
    its = read_csv(synth_data / "test_labels.csv").items[:12]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for params in ("lora", "norm"):
        before = _snapshot(model)
        cls = tta.Tent if method == "tent" else tta.SAR
        kwargs = {"e0": 1.0, "reset_below": -1.0} if method == "sar" else {}  # adapt on every sample, never auto-reset
        adapter = cls(scorer, params=params, lr=1e-2, **kwargs)
        for batch in _batches(scorer, its, 4):
            adapter.batch(batch)  # what the engine calls for each batch
        # What each setting may touch, written here rather than taken from the code under test.
        allowed = {n for n in before if re.search(EXPECTED[params], n)}
        assert set(adapter.params) == allowed, (params, sorted(set(adapter.params) ^ allowed)[:3])
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= allowed, (params, sorted(changed - allowed)[:3])
        adapter.close()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), f"{n} not restored"
            assert p.requires_grad == flags[n], f"{n} trainability not restored"


def test_tent_predicts_with_pre_update_weights_and_leaves_the_model_as_it_was(scorer, items) -> None:
    """The first batch's predictions equal plain scoring (the update happens after the prediction); the second
    batch's do not (the weights moved); afterwards the model scores as before."""
    plain = run(scorer, items).probs
    res = run(scorer, items, "tent", params="norm", lr=1e-1, batch_size=4)
    np.testing.assert_allclose(res.probs[:4], plain[:4], atol=1e-6)
    assert not np.allclose(res.probs[4:], plain[4:], atol=1e-6)
    np.testing.assert_array_equal(run(scorer, items).probs, plain)


def test_tpt_changes_no_weight_and_cleans_up(scorer, items, tiny_loaded) -> None:
    model = tiny_loaded[0]
    plain_before = run(scorer, items[:3]).probs
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    embed = scorer.model.get_input_embeddings()
    hooks_before = len(embed._forward_hooks)
    res = run(scorer, items[:3], "tpt")
    assert res.probs.shape == (3, 4) and res.cost.backwards == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n]
    assert len(embed._forward_hooks) == hooks_before
    # with the soft prompt gone, scoring is back to plain
    np.testing.assert_array_equal(run(scorer, items[:3]).probs, plain_before)
    assert not np.allclose(res.probs, plain_before, atol=1e-7)  # while it was there, the soft prompt did change the answer


def test_zero_votes_among_the_most_confident_views(scorer, items) -> None:
    res = run(scorer, items[:4], "zero", select=0.5)
    np.testing.assert_allclose(res.probs.sum(1), 1.0)
    # 4 of the 8 views vote: every top probability is 0.9 x a vote share (k/4) + 0.1 x a mean, so at least 0.9/4
    assert (res.probs.max(1) >= 0.9 / 4).all() and res.cost.forwards == 8


def test_composition_is_the_methods_composed(scorer, items) -> None:
    from mcvqa.errors import ConfigError

    res = run(scorer, items[:4], "orders", "views", batch_size=8)
    assert res.per_order is not None and res.cost.forwards == 4 + 5
    by_hand = combine([run(scorer, items[:4], "orders").probs, run(scorer, items[:4], "views").probs])
    np.testing.assert_allclose(res.probs, by_hand, atol=1e-6)
    with pytest.raises(ConfigError, match="adapts on its own"):
        TTAConfig(methods=["tent", "views"])
    with pytest.raises(ConfigError, match="choose orders or pride"):
        TTAConfig(methods=["orders", "pride"])


def test_blend_rescores_only_the_least_confident(adapted_scorer, synth_data) -> None:
    its = read_csv(synth_data / "test_labels.csv").items[:12]
    tuned = run(adapted_scorer, its, batch_size=4).probs
    with adapted_scorer.model.disable_adapter():
        adapted_scorer.invalidate()
        base = run(adapted_scorer, its, batch_size=4).probs
    adapted_scorer.invalidate()
    assert not np.allclose(tuned, base, atol=1e-3)  # the adapter matters, so blending can be seen
    res = run(adapted_scorer, its, "blend", blend_fraction=0.25, blend_weight=0.3, batch_size=4)
    unsure = set(np.argsort(tuned.max(axis=1))[:3].tolist())  # 25% of 12, by the tuned model's confidence
    for i in range(len(its)):
        if i in unsure:
            expected = np.exp(0.7 * np.log(tuned[i]) + 0.3 * np.log(base[i]))
            np.testing.assert_allclose(res.probs[i], expected / expected.sum(), atol=1e-6)
        else:
            np.testing.assert_allclose(res.probs[i], tuned[i], atol=1e-7)
    assert res.notes["blended"] == 3 and res.cost.forwards == pytest.approx(1 + 3 / 12)
    full = run(adapted_scorer, its, "blend", blend_fraction=1.0, blend_weight=1.0, batch_size=4)
    np.testing.assert_allclose(full.probs, base, atol=1e-6)  # all rescored, all weight on the base: the base
    np.testing.assert_allclose(run(adapted_scorer, its, batch_size=4).probs, tuned, atol=1e-7)  # adapter back on, cache refreshed


def test_sar_filters_samples_and_resets(adapted_scorer, synth_data) -> None:
    its = read_csv(synth_data / "test_labels.csv").items[:16]
    p = run(adapted_scorer, its, batch_size=8).probs
    e0 = float(np.median(-(p * np.log(p)).sum(1))) / np.log(4)  # half the samples below the margin, half above
    admitted: list[tuple[int, int]] = []

    class Spy(tta.SAR):
        def loss(self, lp, batch):
            ent = entropy(lp.detach())
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
    for batch in _batches(adapted_scorer, its, 8):
        sar.batch(batch)
    first_pass = admitted[0::2]  # each batch: the loss at the weights, then at the sharpness-aware point
    assert sum(a for a, _ in first_pass) not in (0, sum(n for _, n in first_pass))  # some admitted, some rejected
    assert sar.resets == 0 and any(not torch.equal(p, before[n]) for n, p in sar.params.items())
    sar.close()
    # A reset threshold above any loss: the moving average falls under it at the first step, and it fires.
    res = run(adapted_scorer, its, "sar", params="lora", lr=1e-3, sar_e0=1.0, sar_reset_below=10.0, batch_size=8)
    assert res.notes["resets"] == 2  # once per batch
    assert all(torch.equal(p, before[n]) for n, p in tta.adaptable_parameters(adapted_scorer.model, "lora").items())
