"""Image views: mild, text-safe changes of the decoded image, averaged (views) or voted on (ZERO)."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from mcvqa.engine import Scored
from mcvqa.ensemble import normalise
from mcvqa.features import Encoder, Example, Loaded
from mcvqa.images import prepare
from mcvqa.scoring import Scorer, entropy


def _seeded(item_id: str, view: int) -> random.Random:
    return random.Random(f"{item_id}/{view}")


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

ADAPT_VIEWS = ("rescale", "crop", "colour", "jpeg", "crop", "colour", "rescale")
"""The views TPT and ZERO pick their most confident from (the original comes first, as always)."""


def view_examples(encoder: Encoder, question: Loaded, views: Sequence[str]) -> list[Example]:
    """The original view plus each named augmentation of the decoded image, encoded (deterministic per id and view)."""
    raw = question.raw if question.raw is not None else question.image
    out = [encoder.encode(question.item, image=prepare(raw, encoder.image_cfg))]
    for v, name in enumerate(views, start=1):
        out.append(encoder.encode(question.item, image=prepare(VIEWS[name](raw, _seeded(question.id, v)), encoder.image_cfg)))
    return out


def view_logprobs(scorer: Scorer, questions: Sequence[Loaded], views: Sequence[str], batch_size: int) -> Iterator[tuple[range, torch.Tensor]]:
    """(rows, (len(rows), 1 + len(views), 4) log-probs) for consecutive groups of questions, all views of a question
    in one forward (``batch_size`` counts rows, so a group holds ``batch_size // (1 + len(views))`` questions)."""
    v = 1 + len(views)
    step = max(1, batch_size // v)
    for s in range(0, len(questions), step):
        r = range(s, min(s + step, len(questions)))
        exs = [e for i in r for e in view_examples(scorer.encoder, questions[i], views)]
        yield r, scorer.logprobs(scorer.encoder.collate(exs)).view(len(r), v, 4)


def views_batch(scorer: Scorer, questions: Sequence[Loaded], views: Sequence[str], batch_size: int) -> Scored:
    """Log-probabilities averaged over the original image and its views (passive TTA)."""
    out = np.zeros((len(questions), 4))
    for r, lp in view_logprobs(scorer, questions, views, batch_size):
        out[list(r)] = normalise(lp.double().cpu().numpy().mean(axis=1))
    return Scored(out)


def select_confident(lp: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``fraction`` lowest-entropy rows (at least one)."""
    n = max(1, math.ceil(fraction * lp.shape[0]))
    return torch.argsort(entropy(lp))[:n]


def zero_batch(scorer: Scorer, questions: Sequence[Loaded], select: float, batch_size: int, views: Sequence[str] = ADAPT_VIEWS) -> Scored:
    """ZERO (Farina et al. 2024), TPT without gradients: majority vote of each question's most confident views.

    The probabilities are the vote shares smoothed with the confident views' mean (votes alone are badly calibrated,
    as the paper notes)."""
    out = np.zeros((len(questions), 4))
    for r, lp in view_logprobs(scorer, questions, views, batch_size):
        for j, row in enumerate(lp):
            keep = select_confident(row, select)
            votes = np.bincount(row[keep].argmax(-1).cpu().numpy(), minlength=4) / len(keep)
            mean = row[keep].exp().mean(0).double().cpu().numpy()
            out[r[j]] = 0.9 * votes + 0.1 * mean
    return Scored(out / out.sum(-1, keepdims=True))
