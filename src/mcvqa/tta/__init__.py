"""Test-time methods: option-order averaging, letter-prior debiasing (PriDe), image views, blending with the base
model, TENT, SAR, TPT and its gradient-free variant ZERO.

Each method is a function of one batch - ``orders_batch``, ``views_batch``, ``zero_batch``, ``tpt_batch``,
``Tent.batch``, ``SAR.batch`` - and :func:`run` composes them through the engine (journal, resume, OOM halving,
bad images, sharding). ``predict --tta`` calls :func:`run`; so does a script::

    from mcvqa.tta import run
    result = run(scorer, items, TTAConfig(methods=["orders", "views"]))   # result.probs: (N, 4) by original option

Parameter-changing methods (TENT, SAR, TPT) touch only what they claim - LoRA weights, norm weights or the soft
prompt - and restore them bit for bit when they end (tested).
"""

from mcvqa.tta.compose import blend, least_confident, run
from mcvqa.tta.orders import OrdersEncoding, debias, estimate_prior, item_orders, orders_batch
from mcvqa.tta.prompt import SoftPrompt, soft_prompt_token, tpt_batch
from mcvqa.tta.result import Cost, TTAResult
from mcvqa.tta.views import ADAPT_VIEWS, VIEWS, view_examples, views_batch, zero_batch
from mcvqa.tta.weights import SAR, Tent, adaptable_parameters

__all__ = [
    "ADAPT_VIEWS", "SAR", "VIEWS", "Cost", "OrdersEncoding", "SoftPrompt", "TTAResult", "Tent", "adaptable_parameters", "blend",
    "debias", "estimate_prior", "item_orders", "least_confident", "orders_batch", "run", "soft_prompt_token", "tpt_batch",
    "view_examples", "views_batch", "zero_batch",
]
