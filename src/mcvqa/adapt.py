"""Test-time methods: option-order averaging, letter-prior debiasing, image views, ensembles, blending with
the base model, TENT, SAR and TPT (with its gradient-free variant).

Every method is a function (or a small class) over a :class:`~mcvqa.scoring.Scorer` and a list of items,
returning a :class:`TTAResult`: (N, 4) probabilities indexed by ORIGINAL option, optionally the per-order
probabilities (for CircularEval), and its cost in forward and backward passes per question. ``predict``
exposes them as ``--tta`` (composable where it makes sense: orders/pride/views/blend stack; TENT, SAR and
TPT adapt weights or prompts and run on their own).

Parameter-changing methods (TENT, SAR, TPT) touch only what they claim - LoRA weights, norm weights or the
soft prompt - and :meth:`reset` restores them bit for bit (tested).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from tqdm.auto import tqdm

from mcvqa.config import ADAPTIVE, TTAConfig
from mcvqa.data import Item
from mcvqa.engine import Engine, Scored, logits_step
from mcvqa.errors import McvqaError
from mcvqa.features import Batch, Example, OrderedExample, cyclic_orders
from mcvqa.images import prepare
from mcvqa.model import core_and_head
from mcvqa.scoring import MAX_ENTROPY, Scorer, entropy

# ------------------------------------------------------------------------------------------ results


@dataclass
class Cost:
    forwards: float = 0.0
    """Question-level forward passes per question (a shared-prefix pass over V orders counts as V)."""
    backwards: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forwards + other.forwards, self.backwards + other.backwards)


@dataclass
class TTAResult:
    probs: np.ndarray
    """(N, 4) probabilities by original option."""
    cost: Cost = field(default_factory=Cost)
    per_order: np.ndarray | None = None
    """(N, V, 4) probabilities of each question under each option order, by original option."""
    notes: dict[str, Any] = field(default_factory=dict)


def circular_accuracy(per_order: np.ndarray, labels: np.ndarray) -> float:
    """MMBench's CircularEval: a question counts only if it is answered right under every option order."""
    right = per_order.argmax(-1) == labels[:, None]
    return float(right.all(axis=1).mean())


def _normalise(logp: np.ndarray) -> np.ndarray:
    logp = logp - logp.max(axis=-1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=-1, keepdims=True)


def _batches(n: int, bs: int) -> list[range]:
    return [range(s, min(s + bs, n)) for s in range(0, n, bs)]


def _progress(batches: Sequence[range], n: int, desc: str, progress: bool) -> Iterator[range]:
    """Batches, with a bar counting questions (q/s, as plain scoring shows), not batches."""
    with tqdm(total=n, desc=desc, unit="q", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for r in batches:
            yield r
            bar.update(len(r))


# ------------------------------------------------------------------------------------------ plain + orders


def plain(scorer: Scorer, items: Sequence[Item], batch_size: int = 16, progress: bool = False) -> TTAResult:
    enc = scorer.encoder
    out = np.zeros((len(items), 4))
    for r in _progress(_batches(len(items), batch_size), len(items), "plain", progress):
        batch = enc.collate([enc.encode(items[i]) for i in r])
        out[list(r)] = scorer.logprobs(batch).exp().double().cpu().numpy()
    return TTAResult(out / out.sum(-1, keepdims=True), Cost(1.0, 0.0))


def item_orders(item: Item, k: int = 4) -> list[tuple[int, ...]]:
    """The k cyclic rotations of the options sorted by their text.

    Rotating a canonical order (not the order the CSV happens to list) makes the set of orders scored -
    and so the averaged answer - independent of how the options arrived (tested).
    """
    base = sorted(range(4), key=lambda j: (item.options[j], j))
    return [tuple(base[j] for j in rot) for rot in cyclic_orders(k)]


def score_orders(scorer: Scorer, items: Sequence[Item], k: int = 4, batch_size: int = 16, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N, k, 4) log-probabilities by original option under k cyclic orders (image + question shared), and
    the (N, k, 4) orders themselves."""
    enc = scorer.encoder
    out = np.zeros((len(items), k, 4))
    orders = np.array([item_orders(it, k) for it in items], dtype=np.int64).reshape(len(items), k, 4)
    for r in _progress(_batches(len(items), batch_size), len(items), "orders", progress):
        exs = [enc.encode_orders(items[i], [tuple(o) for o in orders[i]]) for i in r]
        out[list(r)] = scorer.logprobs_orders(exs).double().cpu().numpy()
    return out, orders


class OrdersEncoding:
    """Picklable: an item encoded under its k cyclic option orders, images replaced by a blank when unreadable
    (the engine applies the bad-image policy to what comes back)."""

    def __init__(self, encoder: Any, k: int) -> None:
        self.encoder, self.k = encoder, k

    def __call__(self, item: Item) -> OrderedExample:
        return self.encoder.encode_orders(item, item_orders(item, self.k), on_bad_image="skip")


def order_average(scorer: Scorer, items: Sequence[Item], k: int = 4, batch_size: int = 16, progress: bool = False) -> TTAResult:
    """Average log-probabilities over the k cyclic orders, mapped back to option content."""
    lp, _ = score_orders(scorer, items, k, batch_size, progress)
    return TTAResult(_normalise(lp.mean(axis=1)), Cost(float(k), 0.0), per_order=np.exp(lp))


def estimate_prior(order_logprobs: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """PriDe: the model's prior over displayed letters, from questions scored under cyclic orders.

    ``order_logprobs``: (M, V, 4) by ORIGINAL option; ``orders``: (M, V, 4), ``orders[m, v, d]`` = original
    option shown at letter d. Under cyclic permutations every option visits every letter once, so averaging
    the observed log-probability of each displayed letter over orders cancels the content term and leaves
    log prior(letter) + const (Zheng et al. 2024).
    """
    by_letter = np.take_along_axis(order_logprobs, orders, axis=2)  # (M, V, 4) by displayed letter
    log_prior = by_letter.mean(axis=1).mean(axis=0)
    return _normalise(log_prior)


def pride(
    scorer: Scorer, items: Sequence[Item], fraction: float = 0.05, k: int = 4, batch_size: int = 16, seed: int = 0,
    progress: bool = False, min_questions: int = 32,
) -> TTAResult:
    """Estimate the letter prior on ``fraction`` of the questions (scored under k orders), divide it out elsewhere.

    At least ``min_questions`` (or all) are used: a prior over four letters from a handful of questions is
    noise (5% of 160 questions left 8, and PriDe then did nothing for a letter-biased model).
    """
    n = len(items)
    m = min(n, max(4, min_questions, math.ceil(fraction * n)))
    est = sorted(random.Random(seed).sample(range(n), m))
    lp_est, orders = score_orders(scorer, [items[i] for i in est], k, batch_size, progress)
    prior = estimate_prior(lp_est, orders)
    in_est = set(est)
    rest = [i for i in range(n) if i not in in_est]
    probs = np.zeros((n, 4))
    if rest:
        base = plain(scorer, [items[i] for i in rest], batch_size, progress).probs
        probs[rest] = _normalise(np.log(base) - np.log(prior))  # debias the displayed (original) order
    probs[est] = _normalise(lp_est.mean(axis=1))  # these were seen under every order: already debiased
    cost = Cost(1.0 + (k - 1) * m / n, 0.0)
    return TTAResult(probs, cost, notes={"prior": prior.tolist(), "estimation_questions": m})


# ------------------------------------------------------------------------------------------ image views


def _seeded(item: Item, view: int) -> random.Random:
    return random.Random(f"{item.id}/{view}")


def view_rescale(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    s = rng.uniform(0.6, 0.8)
    return img.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)


def view_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """A crop keeping 90% of each side (81% of the area): text near the edges survives, unlike flips."""
    w, h = img.size
    cw, ch = max(1, int(w * 0.9)), max(1, int(h * 0.9))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def view_colour(img: Image.Image, rng: random.Random) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))


def view_jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(40, 70))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


VIEWS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "rescale": view_rescale,
    "crop": view_crop,
    "colour": view_colour,
    "jpeg": view_jpeg,
}
"""Mild, text-safe image changes. No flips: they mirror text and swap left and right."""


def view_examples(scorer: Scorer, item: Item, views: Sequence[str]) -> list[Example]:
    """The original view plus each named augmentation, encoded (deterministic per item and view)."""
    enc = scorer.encoder
    raw = enc.load_raw(item)
    out = [enc.encode(item, image=prepare(raw, enc.image_cfg))]
    for v, name in enumerate(views, start=1):
        out.append(enc.encode(item, image=prepare(VIEWS[name](raw, _seeded(item, v)), enc.image_cfg)))
    return out


def view_logprobs(scorer: Scorer, items: Sequence[Item], views: Sequence[str], batch_size: int, desc: str, progress: bool) -> Iterator[tuple[range, torch.Tensor]]:
    """(rows, (len(rows), 1 + len(views), 4) log-probs) for consecutive groups of questions, all views batched."""
    enc = scorer.encoder
    v = 1 + len(views)
    for r in _progress(_batches(len(items), max(1, batch_size // v)), len(items), desc, progress):
        exs = [e for i in r for e in view_examples(scorer, items[i], views)]
        yield r, scorer.logprobs(enc.collate(exs)).view(len(r), v, 4)


def image_views(scorer: Scorer, items: Sequence[Item], views: Sequence[str] = ("rescale", "crop", "colour", "jpeg"), batch_size: int = 16, progress: bool = False) -> TTAResult:
    """Average log-probabilities over the original image and mild views of it (passive TTA)."""
    out = np.zeros((len(items), 4))
    for r, lp in view_logprobs(scorer, items, views, batch_size, "views", progress):
        out[list(r)] = _normalise(lp.double().cpu().numpy().mean(axis=1))
    return TTAResult(out, Cost(float(1 + len(views)), 0.0))


# ------------------------------------------------------------------------------------------ ensembles


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


def ensemble(members: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted average of log-probabilities (a geometric mean of the members' probabilities)."""
    weights = list(weights) if weights is not None else [1.0] * len(members)
    check_weights(weights, len(members))
    total = float(sum(weights))
    logp = sum(w * np.log(np.clip(m, 1e-12, 1.0)) for w, m in zip(weights, members)) / total
    return _normalise(logp)


def ensemble_files(paths: Sequence[str], weights: Sequence[float] | None = None, each: bool = False) -> tuple[list[str], Any]:
    """Members scored anywhere, one probs.csv each; ids must match (order may differ). The weighted ensemble,
    or with ``each`` the members' (N, 4) arrays in the first file's id order."""
    from mcvqa.errors import DataError
    from mcvqa.evaluate import PROB_COLUMNS, read_probs

    frames = [read_probs(p) for p in paths]
    ids = frames[0]["id"].tolist()
    members = []
    for p, f in zip(paths, frames):
        if set(f["id"]) != set(ids):
            missing = sorted(set(ids) ^ set(f["id"]))[0]
            raise DataError(p, f"ids differ from {paths[0]} (e.g. {missing!r})", fix="score every member on the same test CSV")
        members.append(f.set_index("id").loc[ids, PROB_COLUMNS].to_numpy(dtype=np.float64))
    return ids, members if each else ensemble(members, weights)


def blend_with_base(scorer: Scorer, items: Sequence[Item], fraction: float = 0.1, weight: float = 0.5, batch_size: int = 16, base: TTAResult | None = None, progress: bool = False) -> TTAResult:
    """Score with the adapter; rescore the least confident ``fraction`` with the adapter disabled and blend.

    Later cohort winners used this: where the fine-tuned model is unsure, the base model's knowledge helps.
    """
    model = scorer.model
    if not hasattr(model, "disable_adapter"):
        raise ValueError("blending with the base model needs a LoRA adapter (--adapter)")
    first = base or plain(scorer, items, batch_size, progress)
    n = len(items)
    m = max(1, math.ceil(fraction * n))
    unsure = np.argsort(first.probs.max(axis=1))[:m]
    with model.disable_adapter():
        scorer.invalidate()
        try:
            base_probs = plain(scorer, [items[i] for i in unsure], batch_size, progress).probs
        finally:
            scorer.invalidate()
    probs = first.probs.copy()
    probs[unsure] = _normalise((1 - weight) * np.log(np.clip(first.probs[unsure], 1e-12, 1)) + weight * np.log(np.clip(base_probs, 1e-12, 1)))
    return TTAResult(probs, first.cost + Cost(m / n, 0.0), first.per_order, notes={"blended": int(m)})


# ------------------------------------------------------------------------------------------ TENT / SAR


def adaptable_parameters(model: Any, which: str) -> dict[str, torch.nn.Parameter]:
    """``lora``: the LoRA matrices; ``norm``: the language model's RMSNorm weights."""
    params = dict(model.named_parameters())
    if which == "lora":
        chosen = {n: p for n, p in params.items() if "lora_" in n}
        if not chosen:
            raise ValueError("no LoRA weights to adapt: pass --adapter, or adapt norm weights (tta.params=norm)")
    elif which == "norm":
        chosen = {n: p for n, p in params.items() if "language_model" in n and "norm" in n.lower()}
    else:
        raise ValueError(f"tta.params must be lora or norm, got {which!r}")
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

    Predictions come from the forward pass before the batch's update (steps=1: the same pass). With
    ``episodic`` the weights are reset after every batch.
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

    def score(self, items: Sequence[Item]) -> np.ndarray:
        """(B, 4) predictions for one batch (before its update), then the update: online TTA's unit of work."""
        enc = self.scorer.encoder
        batch = enc.collate([enc.encode(it) for it in items])
        return self.adapt_batch(batch).exp().double().cpu().numpy()

    def run(self, items: Sequence[Item], batch_size: int = 16, progress: bool = False) -> TTAResult:
        out = np.zeros((len(items), 4))
        for r in _progress(_batches(len(items), batch_size), len(items), type(self).__name__, progress):
            out[list(r)] = self.score([items[i] for i in r])
        return TTAResult(out / out.sum(-1, keepdims=True), self.cost(), notes=self.notes())

    def notes(self) -> dict[str, Any]:
        return {}

    def cost(self) -> Cost:
        return Cost(float(self.steps), float(self.steps))


class SAR(Tent):
    """SAR (Niu et al. 2023): TENT on reliable samples only (entropy < ``e0`` x ln 4), with a sharpness-aware
    step (rho) and a reset when the moving average of the loss collapses; plus the reference authors' wish, a
    consistency term pulling the prediction on an augmented view towards the original's.
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

    def score(self, items: Sequence[Item]) -> np.ndarray:
        if self.consistency <= 0:
            return super().score(items)
        enc = self.scorer.encoder
        pairs = [view_examples(self.scorer, it, [self.view]) for it in items]
        batch = enc.collate([p[0] for p in pairs])
        self._view_batch = enc.collate([p[1] for p in pairs])
        try:
            return self.adapt_batch(batch).exp().double().cpu().numpy()
        finally:
            self._view_batch = None

    def notes(self) -> dict[str, Any]:
        return {"resets": self.resets}

    def cost(self) -> Cost:
        extra = 1.0 if self.consistency > 0 else 0.0
        return Cost(self.steps * (2 + 2 * extra), self.steps * 2.0)


# ------------------------------------------------------------------------------------------ TPT / ZERO


class SoftPrompt:
    """``k`` learnable embeddings placed at the start of the question, through a placeholder token.

    A forward hook on the token embedding swaps the placeholder rows for the learnable vectors, so the
    rest of the pipeline (prefix cache, images, positions) is untouched and everything else stays frozen.
    """

    def __init__(self, scorer: Scorer, k: int = 4, init_text: str = "사진을 잘 보고") -> None:
        self.scorer = scorer
        tok = scorer.encoder.tokenizer
        self.placeholder = soft_prompt_token(tok)
        core, _ = core_and_head(scorer.model)
        self.embed = core.language_model.get_input_embeddings()
        init_ids = tok.encode(init_text, add_special_tokens=False)[:k] or [self.placeholder]
        while len(init_ids) < k:
            init_ids.append(init_ids[-1])
        with torch.no_grad():
            # The embedding module's output, not its weight rows: Gemma scales embeddings by sqrt(hidden).
            init = self.embed(torch.tensor([init_ids], device=self.embed.weight.device))[0].detach().clone().float()
        self.init = init
        self.vectors = torch.nn.Parameter(init.clone())
        self.k = k
        self.handle = self.embed.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        mask = ids == self.placeholder
        if not bool(mask.any()):
            return output
        out = output.clone()
        n_rows = int(mask.sum()) // self.k
        out[mask] = self.vectors.to(out.dtype).repeat(n_rows, 1)
        return out

    def reset(self) -> None:
        with torch.no_grad():
            self.vectors.copy_(self.init)

    def attach(self, ex: Example) -> Example:
        ex.question_ids = [self.placeholder] * self.k + ex.question_ids
        return ex

    def close(self) -> None:
        self.handle.remove()


SOFT_PROMPT_TOKENS = ("<|box_start|>", "<unused0>", "<|reserved_special_token_0|>", "<quad>")
"""Tokens that never occur in a question, one of which every supported tokenizer has (Qwen's box marker; Gemma's
unused pieces; InternVL's quad marker)."""


def soft_prompt_token(tokenizer: Any) -> int:
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in SOFT_PROMPT_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != unk and tokenizer.convert_ids_to_tokens(tid) == token:
            return tid
    raise McvqaError(f"test-time prompt tuning needs a reserved token the questions never contain; this tokenizer has none of {', '.join(SOFT_PROMPT_TOKENS)}")


def _select_confident(lp: torch.Tensor, fraction: float) -> torch.Tensor:
    n = max(1, math.ceil(fraction * lp.shape[0]))
    return torch.argsort(entropy(lp))[:n]


def tpt(
    scorer: Scorer, items: Sequence[Item], views: Sequence[str] = ("rescale", "crop", "colour", "jpeg", "crop", "colour", "rescale"),
    k: int = 4, lr: float = 5e-3, select: float = 0.3, progress: bool = False,
) -> TTAResult:
    """TPT (Shu et al. 2022): per question, one step on a soft prompt minimising the entropy of the averaged
    prediction over its most confident views; predict the original view with the tuned prompt; reset."""
    sp = SoftPrompt(scorer, k)
    enc = scorer.encoder
    flags = {n: p.requires_grad for n, p in scorer.model.named_parameters()}
    for p in scorer.model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([sp.vectors], lr=lr)
    out = np.zeros((len(items), 4))
    try:
        for i, it in enumerate(tqdm(items, desc="TPT", unit="q", disable=not progress, leave=False, dynamic_ncols=True)):
            exs = [sp.attach(e) for e in view_examples(scorer, it, views)]
            batch = enc.collate(exs)
            lp = scorer.logprobs(batch, grad=True, prefix_grad=False)  # the prompt sits after the cached prefix
            keep = _select_confident(lp.detach(), select)
            avg = torch.logsumexp(lp[keep], dim=0) - math.log(len(keep))
            loss = entropy(avg[None]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                final = scorer.logprobs(enc.collate(exs[:1]))
            out[i] = final[0].exp().double().cpu().numpy()
            sp.reset()
            opt = torch.optim.AdamW([sp.vectors], lr=lr)
    finally:
        sp.close()
        for n, p in scorer.model.named_parameters():
            p.requires_grad_(flags[n])
    return TTAResult(out / out.sum(-1, keepdims=True), Cost(float(1 + len(views) + 1), 1.0))


def zero(scorer: Scorer, items: Sequence[Item], views: Sequence[str] = ("rescale", "crop", "colour", "jpeg", "crop", "colour", "rescale"), select: float = 0.3, batch_size: int = 16, progress: bool = False) -> TTAResult:
    """ZERO (Farina et al. 2024), TPT without gradients: majority vote of the most confident views.

    Returned probabilities are the vote shares smoothed with the confident views' mean (votes alone are
    badly calibrated, as the paper notes)."""
    out = np.zeros((len(items), 4))
    for r, lp in view_logprobs(scorer, items, views, batch_size, "ZERO", progress):
        for j, row in enumerate(lp):
            keep = _select_confident(row, select)
            votes = np.bincount(row[keep].argmax(-1).cpu().numpy(), minlength=4) / len(keep)
            mean = row[keep].exp().mean(0).double().cpu().numpy()
            out[r[j]] = 0.9 * votes + 0.1 * mean
    return TTAResult(out / out.sum(-1, keepdims=True), Cost(float(1 + len(views)), 0.0))


# ------------------------------------------------------------------------------------------ composition


def run_tta(scorer: Scorer, items: Sequence[Item], cfg: TTAConfig, engine: Engine) -> TTAResult:
    """The methods named in ``cfg.methods``, composed (orders | pride -> views -> blend; or one adaptive method
    alone), every batch through ``engine``: journaled, resumable, sharded, under the bad-image policy.

    Each phase is a function of its batch alone, so a resumed run equals an uninterrupted one - except for online
    TENT/SAR (``tta.episodic: false``), whose weights carry over from batch to batch: after a resume they start
    again from the source weights at the first batch not yet scored (README, "Reliability").
    """
    n = len(items)
    every = range(n)
    methods = list(cfg.methods)  # combinations were checked when the config was built (TTAConfig)
    adaptive = [m for m in methods if m in ADAPTIVE]
    if adaptive:
        return _run_adaptive(adaptive[0], scorer, cfg, engine)

    encode = OrdersEncoding(scorer.encoder, cfg.orders)  # in DataLoader workers, ahead of the GPU

    def orders_fn(exs: list[OrderedExample]) -> Scored:
        lp = scorer.logprobs_orders(exs).double().cpu().numpy()
        return Scored(_normalise(lp.mean(axis=1)), np.exp(lp))

    def views_fn(b: list[Item]) -> Scored:
        return Scored(image_views(scorer, b, cfg.views, engine.batch_size).probs)

    views = engine.map("views", every, views_fn, "views") if "views" in methods else None
    view_cost = Cost(float(1 + len(cfg.views)), 0.0)
    if "pride" in methods:
        m = min(n, max(4, cfg.pride_min, math.ceil(cfg.pride_fraction * n)))
        est = sorted(random.Random(0).sample(range(n), m))
        in_est = set(est)
        rest = [i for i in every if i not in in_est]
        scored = engine.map("pride-estimate", est, orders_fn, "PriDe prior", prepare=encode)
        orders = np.array([item_orders(items[i], cfg.orders) for i in est], dtype=np.int64).reshape(m, cfg.orders, 4)
        prior = estimate_prior(np.log(np.clip(scored.per_order, 1e-300, 1.0)), orders)
        probs = np.zeros((n, 4))
        probs[est] = scored.probs  # seen under every order: already debiased
        if rest:
            probs[rest] = _normalise(np.log(engine.score(scorer, rest, sort_by_length=False, phase="plain", desc="PriDe").probs) - np.log(prior))
        res = TTAResult(probs, Cost(1.0 + (cfg.orders - 1) * m / n, 0.0), notes={"prior": prior.tolist(), "estimation_questions": m})
    elif "orders" in methods:
        out = engine.map("orders", every, orders_fn, "orders", prepare=encode)
        res = TTAResult(out.probs, Cost(float(cfg.orders), 0.0), per_order=out.per_order)
    elif views is not None:
        res, views = TTAResult(views.probs, view_cost), None  # the views include the original image: no plain pass
    else:
        res = TTAResult(engine.score(scorer, every, sort_by_length=False, phase="plain", desc="plain").probs, Cost(1.0, 0.0))
    if views is not None:
        res = TTAResult(ensemble([res.probs, views.probs]), res.cost + view_cost, res.per_order, res.notes)
    if "blend" in methods:
        res = _blend(res, scorer, cfg, engine)
    return res


def _run_adaptive(m: str, scorer: Scorer, cfg: TTAConfig, engine: Engine) -> TTAResult:
    """One adaptive method (tpt, zero, tent, sar) alone, batch by batch through the engine."""
    every = range(len(engine.items))
    if m == "tpt":
        out = engine.map("tpt", every, lambda b: Scored(tpt(scorer, b, k=cfg.tpt_tokens, lr=cfg.tpt_lr, select=cfg.select).probs), "TPT")
        return TTAResult(out.probs, Cost(float(1 + 7 + 1), 1.0))
    if m == "zero":
        out = engine.map("zero", every, lambda b: Scored(zero(scorer, b, select=cfg.select, batch_size=engine.batch_size).probs), "ZERO")
        return TTAResult(out.probs, Cost(8.0, 0.0))
    cls = Tent if m == "tent" else SAR
    kwargs: dict[str, Any] = dict(params=cfg.params, lr=cfg.lr, steps=cfg.steps, episodic=cfg.episodic, optimizer=cfg.optimizer)
    if m == "sar":
        kwargs.update(e0=cfg.sar_e0, rho=cfg.sar_rho, reset_below=cfg.sar_reset_below, consistency=cfg.consistency)
    adapter = cls(scorer, **kwargs)
    try:
        out = engine.map(m, every, lambda b: Scored(adapter.score(b)), m.upper())
        return TTAResult(out.probs, adapter.cost(), notes=adapter.notes())
    finally:
        adapter.close()


def _blend(res: TTAResult, scorer: Scorer, cfg: TTAConfig, engine: Engine) -> TTAResult:
    """The least confident ``blend_fraction`` of questions also scored with the adapter switched off, blended in."""
    n = len(engine.items)
    model = scorer.model
    if not hasattr(model, "disable_adapter"):
        raise McvqaError("--tta blend needs a LoRA adapter (--adapter): it blends the adapted model with its base")
    m = max(1, math.ceil(cfg.blend_fraction * n))
    unsure = sorted(np.argsort(res.probs.max(axis=1), kind="stable")[:m].tolist())

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
    w = cfg.blend_weight
    probs[unsure] = _normalise((1 - w) * np.log(np.clip(res.probs[unsure], 1e-12, 1)) + w * np.log(np.clip(base, 1e-12, 1)))
    return TTAResult(probs, res.cost + Cost(m / n, 0.0), res.per_order, {**res.notes, "blended": int(m)})
