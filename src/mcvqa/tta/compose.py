"""The one composition of test-time methods: what ``predict --tta`` runs and what library callers call.

orders | pride -> views -> blend stack; tent, sar, tpt and zero adapt weights or prompts and run alone (the
combinations are checked when the config is built, :class:`~mcvqa.config.TTAConfig`). Every method is a function of
one batch; the engine maps it, so each phase is journaled, resumable, sharded and under the bad-image policy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from mcvqa.config import ADAPTIVE, TTAConfig
from mcvqa.data import Item
from mcvqa.engine import Engine, Scored, logits_step
from mcvqa.ensemble import combine, normalise
from mcvqa.errors import McvqaError
from mcvqa.features import Batch
from mcvqa.scoring import Scorer
from mcvqa.tta.orders import OrdersEncoding, debias, estimate_prior, item_orders, orders_batch
from mcvqa.tta.prompt import tpt_batch
from mcvqa.tta.result import Cost, TTAResult
from mcvqa.tta.views import ADAPT_VIEWS, views_batch, zero_batch
from mcvqa.tta.weights import SAR, Tent


def first_pass(cfg: TTAConfig, encoder: Any, n: int) -> dict[str, Any] | None:
    """The engine pass :func:`run` makes first, as :meth:`Engine.start`'s arguments, where it needs the encoder alone
    (``predict`` starts its loader while the weights load): the orders pass of orders (with or without blend). None
    where the first pass needs the model (views, PriDe's sample, the adapting methods)."""
    methods = set(cfg.methods)
    if "orders" not in methods or methods & ({"views", "pride"} | set(ADAPTIVE)):
        return None
    return {"phase": "orders", "indices": range(n), "prepare": OrdersEncoding(encoder, cfg.orders), "sort_by_length": False}


def run(scorer: Scorer, items: Sequence[Item], cfg: TTAConfig, engine: Engine | None = None, *, batch_size: int = 16, progress: bool = False) -> TTAResult:
    """The methods named in ``cfg.methods``, composed, every batch through ``engine`` (by default one without a
    journal, ``batch_size`` questions a batch).

    Each phase is a function of its batch alone, so a resumed run equals an uninterrupted one - except for online
    TENT/SAR (``tta.episodic: false``), whose weights carry over from batch to batch: after a resume they start again
    from the source weights at the first batch not yet scored (README, "Reliability").
    """
    engine = engine or Engine(items, scorer.encoder, batch_size, progress=progress)
    n = len(items)
    every = range(n)
    methods = list(cfg.methods)
    adaptive = [m for m in methods if m in ADAPTIVE]
    if adaptive:
        return _adaptive(adaptive[0], scorer, cfg, engine)

    encode = OrdersEncoding(scorer.encoder, cfg.orders)
    orders_fn = lambda exs: orders_batch(scorer, exs)  # noqa: E731
    views_cost = Cost(float(1 + len(cfg.views)), 0.0)
    views = None
    if "views" in methods:
        views = engine.map("views", every, lambda qs: views_batch(scorer, qs, cfg.views, engine.batch_size), "views", raw=True)
    if "pride" in methods:
        res = _pride(scorer, items, cfg, engine, orders_fn, encode)
    elif "orders" in methods:
        out = engine.map("orders", every, orders_fn, "orders", prepare=encode)  # the pass first_pass describes
        res = TTAResult(out.probs, Cost(float(cfg.orders), 0.0), per_order=out.per_order)
    elif views is not None:
        res, views = TTAResult(views.probs, views_cost), None  # the views include the original image: no plain pass
    else:
        res = TTAResult(engine.score(scorer, every, sort_by_length=False, phase="plain", desc="plain").probs, Cost(1.0, 0.0))
    if views is not None:
        res = TTAResult(combine([res.probs, views.probs]), res.cost + views_cost, res.per_order, res.notes)
    if "blend" in methods:
        res = _blend(res, scorer, cfg, engine)
    return res


def _pride(scorer: Scorer, items: Sequence[Item], cfg: TTAConfig, engine: Engine, orders_fn: Any, encode: OrdersEncoding) -> TTAResult:
    """PriDe: the letter prior estimated on a sample scored under every order (at least ``pride_min`` questions: a
    prior over four letters from a handful is noise), divided out of the others' plain scores."""
    n = len(items)
    m = min(n, max(4, cfg.pride_min, math.ceil(cfg.pride_fraction * n)))
    est = sorted(random.Random(0).sample(range(n), m))
    in_est = set(est)
    rest = [i for i in range(n) if i not in in_est]
    scored = engine.map("pride-estimate", est, orders_fn, "PriDe prior", prepare=encode)
    orders = np.array([item_orders(items[i], cfg.orders) for i in est], dtype=np.int64).reshape(m, cfg.orders, 4)
    prior = estimate_prior(np.log(np.clip(scored.per_order, 1e-300, 1.0)), orders)
    probs = np.zeros((n, 4))
    probs[est] = scored.probs  # seen under every order: already debiased
    if rest:
        probs[rest] = debias(engine.score(scorer, rest, sort_by_length=False, phase="plain", desc="PriDe").probs, prior)
    return TTAResult(probs, Cost(1.0 + (cfg.orders - 1) * m / n, 0.0), notes={"prior": prior.tolist(), "estimation_questions": m})


def _adaptive(m: str, scorer: Scorer, cfg: TTAConfig, engine: Engine) -> TTAResult:
    """One adaptive method (tpt, zero, tent, sar) alone, batch by batch through the engine."""
    every = range(len(engine.items))
    if m == "tpt":
        out = engine.map("tpt", every, lambda qs: tpt_batch(scorer, qs, k=cfg.tpt_tokens, lr=cfg.tpt_lr, select=cfg.select), "TPT", raw=True)
        return TTAResult(out.probs, Cost(float(1 + len(ADAPT_VIEWS) + 1), 1.0))
    if m == "zero":
        out = engine.map("zero", every, lambda qs: zero_batch(scorer, qs, cfg.select, engine.batch_size), "ZERO", raw=True)
        return TTAResult(out.probs, Cost(float(1 + len(ADAPT_VIEWS)), 0.0))
    kwargs: dict[str, Any] = dict(params=cfg.params, lr=cfg.lr, steps=cfg.steps, episodic=cfg.episodic, optimizer=cfg.optimizer)
    if m == "sar":
        kwargs.update(e0=cfg.sar_e0, rho=cfg.sar_rho, reset_below=cfg.sar_reset_below, consistency=cfg.consistency)
    adapter = (Tent if m == "tent" else SAR)(scorer, **kwargs)
    try:
        out = engine.map(m, every, adapter.batch, m.upper(), raw=m == "sar" and cfg.consistency > 0)
        return TTAResult(out.probs, adapter.cost(), notes=adapter.notes())
    finally:
        adapter.close()


def least_confident(probs: np.ndarray, fraction: float) -> list[int]:
    """The ``fraction`` of rows (at least one) whose top probability is lowest, in row order."""
    m = max(1, math.ceil(fraction * len(probs)))
    return sorted(np.argsort(probs.max(axis=1), kind="stable")[:m].tolist())


def blend(probs: np.ndarray, base: np.ndarray, weight: float) -> np.ndarray:
    """Log-linear blend: ``weight`` on the base model's log-probabilities, the rest on the adapted model's."""
    return normalise((1 - weight) * np.log(np.clip(probs, 1e-12, 1)) + weight * np.log(np.clip(base, 1e-12, 1)))


def _blend(res: TTAResult, scorer: Scorer, cfg: TTAConfig, engine: Engine) -> TTAResult:
    """The least confident ``blend_fraction`` of questions also scored with the adapter switched off, blended in
    (later cohort winners did this: where the fine-tuned model is unsure, the base model's knowledge helps)."""
    n = len(engine.items)
    model = scorer.model
    if not hasattr(model, "disable_adapter"):
        raise McvqaError("--tta blend needs a LoRA adapter (--adapter): it blends the adapted model with its base")
    unsure = least_confident(res.probs, cfg.blend_fraction)
    adapted = logits_step(scorer)

    def base_step(batch: Batch) -> Scored:
        with model.disable_adapter():
            scorer.invalidate()
            try:
                return adapted(batch)
            finally:
                scorer.invalidate()

    base = engine.score(scorer, unsure, sort_by_length=False, phase="blend-base", desc="blend", step=base_step).probs
    probs = res.probs.copy()
    probs[unsure] = blend(res.probs[unsure], base, cfg.blend_weight)
    return TTAResult(probs, res.cost + Cost(len(unsure) / n, 0.0), res.per_order, {**res.notes, "blended": len(unsure)})
