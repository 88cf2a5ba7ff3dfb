"""TENT and SAR: adapt the LoRA (or norm) weights at test time, touching nothing else, restoring them exactly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mcvqa.engine import Scored
from mcvqa.errors import McvqaError
from mcvqa.features import Batch, Loaded
from mcvqa.scoring import MAX_ENTROPY, Scorer, entropy
from mcvqa.tta.result import Cost
from mcvqa.tta.views import view_examples


def adaptable_parameters(model: Any, which: str) -> dict[str, torch.nn.Parameter]:
    """``lora``: the LoRA matrices; ``norm``: the language model's RMSNorm weights."""
    params = dict(model.named_parameters())
    if which == "lora":
        chosen = {n: p for n, p in params.items() if "lora_" in n}
        if not chosen:
            raise McvqaError("no LoRA weights to adapt: pass --adapter, or adapt norm weights (--set tta.params=norm)")
    elif which == "norm":
        chosen = {n: p for n, p in params.items() if "language_model" in n and "norm" in n.lower()}
    else:
        raise McvqaError(f"tta.params must be lora or norm, got {which!r}")
    return chosen


class _WeightAdapter:
    """Shared machinery: freeze all but the chosen parameters, remember them, restore them exactly."""

    def __init__(self, scorer: Scorer, params: str, lr: float, optimizer: str) -> None:
        self.scorer = scorer
        self.params = adaptable_parameters(scorer.model, params)
        self.initial = {n: p.detach().clone() for n, p in self.params.items()}
        self.flags = {n: p.requires_grad for n, p in scorer.model.named_parameters()}
        for n, p in scorer.model.named_parameters():
            p.requires_grad_(n in self.params)
        self.lr = lr
        self.optimizer_name = optimizer
        self.optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        ps = list(self.params.values())
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(ps, lr=self.lr, momentum=0.9)
        return torch.optim.Adam(ps, lr=self.lr)

    def reset(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.initial[n])
        self.optimizer = self._new_optimizer()
        self.scorer.invalidate()

    def close(self) -> None:
        """Restore the original weights and trainability."""
        self.reset()
        for n, p in self.scorer.model.named_parameters():
            p.requires_grad_(self.flags[n])


class Tent(_WeightAdapter):
    """TENT (Wang et al. 2021): minimise the entropy of each batch's 4-way answer distribution, online.

    Predictions come from the forward pass before the batch's update (steps=1: the same pass). With ``episodic`` the
    weights are reset after every batch.
    """

    def __init__(self, scorer: Scorer, params: str = "lora", lr: float = 1e-4, steps: int = 1, episodic: bool = False, optimizer: str = "adam") -> None:
        super().__init__(scorer, params, lr, optimizer)
        self.steps = steps
        self.episodic = episodic

    def loss(self, lp: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        return entropy(lp).mean()

    def adapt_batch(self, batch: Batch) -> torch.Tensor:
        pred = None
        for step in range(self.steps):
            lp = self.scorer.logprobs(batch, grad=True)
            if step == 0:
                pred = lp.detach()
            loss = self.loss(lp, batch)
            if loss is not None and loss.requires_grad:
                loss.backward()
                self.update(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scorer.invalidate()
        if self.episodic:
            self.reset()
        assert pred is not None
        return pred

    def update(self, batch: Batch) -> None:
        self.optimizer.step()

    def batch(self, questions: Sequence[Loaded]) -> Scored:
        """One batch's predictions (before its update), then the update: online TTA's unit of work."""
        enc = self.scorer.encoder
        batch = enc.collate([enc.encode(q.item, image=q.image) for q in questions])
        return Scored(self.adapt_batch(batch).exp().double().cpu().numpy())

    def notes(self) -> dict[str, Any]:
        return {}

    def cost(self) -> Cost:
        return Cost(float(self.steps), float(self.steps))


class SAR(Tent):
    """SAR (Niu et al. 2023): TENT on reliable samples only (entropy < ``e0`` x ln 4), with a sharpness-aware step
    (rho) and a reset when the moving average of the loss collapses; plus the reference authors' wish, a consistency
    term pulling the prediction on an augmented view towards the original's.
    """

    def __init__(
        self, scorer: Scorer, params: str = "lora", lr: float = 1e-4, steps: int = 1, episodic: bool = False, optimizer: str = "sgd",
        e0: float = 0.4, rho: float = 0.05, reset_below: float = 0.2, consistency: float = 0.0, view: str = "crop",
    ) -> None:
        super().__init__(scorer, params, lr, steps, episodic, optimizer)
        self.margin = e0 * MAX_ENTROPY
        self.rho = rho
        self.reset_below = reset_below
        self.consistency = consistency
        self.view = view
        self.ema: float | None = None
        self.resets = 0
        self._view_batch: Batch | None = None

    def loss(self, lp: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        ent = entropy(lp)
        reliable = ent < self.margin
        if not bool(reliable.any()):
            return None
        loss = ent[reliable].mean()
        if self.consistency > 0 and self._view_batch is not None:
            lv = self.scorer.logprobs(self._view_batch, grad=True)
            # KL(original || view), the original detached: the view is pulled towards the original.
            kl = (lp.detach().exp() * (lp.detach() - lv)).sum(-1)
            loss = loss + self.consistency * kl[reliable].mean()
        return loss

    def update(self, batch: Batch) -> None:
        # Sharpness-aware minimisation: climb to the worst point within rho, take the gradient there.
        ps = [p for p in self.params.values() if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in ps]), 2) + 1e-12
        eps = []
        with torch.no_grad():
            for p in ps:
                e = p.grad * (self.rho / norm)
                p.add_(e)
                eps.append(e)
        self.optimizer.zero_grad(set_to_none=True)
        self.scorer.invalidate()
        loss2 = self.loss(self.scorer.logprobs(batch, grad=True), batch)
        if loss2 is not None:
            loss2.backward()
        with torch.no_grad():
            for p, e in zip(ps, eps):
                p.sub_(e)
        if loss2 is not None:
            self.optimizer.step()
            value = float(loss2.detach())
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
            if self.ema < self.reset_below:
                self.reset()
                self.ema = None
                self.resets += 1

    def batch(self, questions: Sequence[Loaded]) -> Scored:
        if self.consistency <= 0:
            return super().batch(questions)
        enc = self.scorer.encoder
        pairs = [view_examples(enc, q, [self.view]) for q in questions]
        batch = enc.collate([p[0] for p in pairs])
        self._view_batch = enc.collate([p[1] for p in pairs])
        try:
            return Scored(self.adapt_batch(batch).exp().double().cpu().numpy())
        finally:
            self._view_batch = None

    def notes(self) -> dict[str, Any]:
        return {"resets": self.resets}

    def cost(self) -> Cost:
        extra = 1.0 if self.consistency > 0 else 0.0
        return Cost(self.steps * (2 + 2 * extra), self.steps * 2.0)
