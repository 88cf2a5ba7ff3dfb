"""Option orders: the cyclic rotations of a question's options, scored in one pass, and PriDe's letter prior."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mcvqa.data import Item
from mcvqa.engine import Scored
from mcvqa.ensemble import normalise
from mcvqa.features import OrderedExample, cyclic_orders
from mcvqa.scoring import Scorer


def item_orders(item: Item, k: int = 4) -> list[tuple[int, ...]]:
    """The k cyclic rotations of the options sorted by their text.

    Rotating a canonical order (not the order the CSV happens to list) makes the set of orders scored - and so the
    averaged answer - independent of how the options arrived (tested).
    """
    base = sorted(range(4), key=lambda j: (item.options[j], j))
    return [tuple(base[j] for j in rot) for rot in cyclic_orders(k)]


class OrdersEncoding:
    """Picklable (it runs in DataLoader workers, ahead of the GPU): an item encoded under its k cyclic option orders,
    an unreadable image replaced by a blank and named in ``bad_image`` (the engine applies the policy)."""

    def __init__(self, encoder: Any, k: int) -> None:
        self.encoder, self.k = encoder, k

    def __call__(self, item: Item) -> OrderedExample:
        return self.encoder.encode_orders(item, item_orders(item, self.k), on_bad_image="skip")

    # Equal for the same encoder and orders: the engine takes the batches a loader started early made with an equal one.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, OrdersEncoding) and other.encoder is self.encoder and other.k == self.k

    def __hash__(self) -> int:
        return hash((id(self.encoder), self.k))


def orders_batch(scorer: Scorer, examples: list[OrderedExample]) -> Scored:
    """One batch under every order (image and question shared): the log-probabilities averaged over orders, mapped
    back to option content, and each order's probabilities (for CircularEval and PriDe)."""
    lp = scorer.logprobs_orders(examples).double()
    # On the GPU, copied back by the engine while the next batch runs (Scored.copy_to_host).
    return Scored(torch.softmax(lp.mean(dim=1), dim=-1), lp.exp())


def estimate_prior(order_logprobs: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """PriDe: the model's prior over displayed letters, from questions scored under cyclic orders.

    ``order_logprobs``: (M, V, 4) by ORIGINAL option; ``orders``: (M, V, 4), ``orders[m, v, d]`` = original option
    shown at letter d. Under cyclic permutations every option visits every letter once, so averaging the observed
    log-probability of each displayed letter over orders cancels the content term and leaves log prior(letter) +
    const (Zheng et al. 2024).
    """
    by_letter = np.take_along_axis(order_logprobs, orders, axis=2)  # (M, V, 4) by displayed letter
    return normalise(by_letter.mean(axis=1).mean(axis=0))


def debias(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Probabilities of questions shown in their original order, the letter prior divided out."""
    return normalise(np.log(probs) - np.log(prior))
