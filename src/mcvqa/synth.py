"""Synthetic datasets in the competition's exact format: Pillow drawings and Korean questions.

Every answer is determined by the picture (colour, shape, position, count, a large digit or letter, or
which colour is *absent* - the negation type), so a model can only score well by looking. Deterministic
for a seed; answer letters exactly balanced over a-d.

Options are written in a canonical order by default (each kind's vocabulary order, with the distractors
chosen so the answer lands on the intended letter). A tiny model trained from scratch learns to match
option text to a picture far faster that way; ``option_order="random"`` gives the harder, competition-like
arrangement.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mcvqa.config import LETTERS
from mcvqa.io import Staged, disk_error, disk_problem

COLOURS: dict[str, tuple[int, int, int]] = {
    "빨간색": (220, 30, 30),
    "주황색": (245, 140, 20),
    "노란색": (240, 215, 30),
    "초록색": (40, 160, 60),
    "파란색": (30, 70, 220),
    "보라색": (140, 50, 190),
    "분홍색": (245, 120, 185),
    "갈색": (125, 75, 35),
    "검은색": (20, 20, 20),
    "하늘색": (120, 200, 245),
}
SHAPES = ("원", "사각형", "삼각형", "별", "마름모", "십자가")
POSITIONS = ("왼쪽 위", "오른쪽 위", "왼쪽 아래", "오른쪽 아래")
COUNTS = tuple(f"{n}개" for n in range(1, 7))
DIGITS = tuple(str(d) for d in range(10))
LATIN = tuple("ABCDEFGHJKLMNPRSTUVWXYZ")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("이 도형은 무슨 색인가요?", "사진 속 도형의 색깔은 무엇인가요?", "그림에 보이는 도형은 어떤 색인가요?"),
    "shape": ("사진에 있는 도형은 무엇인가요?", "이 그림 속 도형의 모양은 무엇인가요?", "어떤 모양의 도형이 보이나요?"),
    "position": ("도형은 사진의 어느 쪽에 있나요?", "그림에서 도형이 놓인 위치는 어디인가요?", "도형이 있는 곳은 사진의 어디인가요?"),
    "count": ("사진 속 도형은 몇 개인가요?", "그림에 보이는 도형의 개수는 몇 개인가요?", "도형이 모두 몇 개 있나요?"),
    "digit": ("사진에 쓰인 숫자는 무엇인가요?", "그림 속에 크게 적힌 숫자는 무엇인가요?"),
    "letter": ("사진에 적힌 알파벳은 무엇인가요?", "그림 속 글자는 어떤 알파벳인가요?"),
    "absent": ("이 사진에서 볼 수 없는 색은 무엇인가요?", "그림 속 도형의 색이 아닌 것은 무엇인가요?"),
}
KINDS = tuple(QUESTIONS)
VOCAB: dict[str, Sequence[str]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "count": COUNTS,
    "digit": DIGITS,
    "letter": LATIN,
    "absent": tuple(COLOURS),
}


@dataclass
class SynthConfig:
    train: int = 2000
    """Labelled rows in train.csv."""
    test: int = 500
    """Rows in test.csv (labels in test_labels.csv)."""
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    """Question kinds to draw from, round-robin."""
    seed: int = 0
    """Seed: the same seed gives byte-identical CSVs and images."""
    option_order: str = "canonical"
    """canonical (each kind's vocabulary order) | random (shuffled per question)."""
    size: tuple[int, int] = (240, 180)
    """Landscape canvas (w, h); half the images are drawn portrait, like the competition's photos."""
    shift: str = "none"
    """Distribution shift for robustness tests: none | colour_cast | blur | small (smaller shapes) | noise."""
    answer_skew: float = 0.0
    """Fraction of rows whose answer is forced to letter a (0: balanced). Makes a letter-biased training set."""
    values: int = 0
    """Use only the first N values of each kind's vocabulary (0: all). values=4 fixes every kind's options."""
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown synth kind {unknown[0]!r}; known: {', '.join(KINDS)}")
        if self.option_order not in ("canonical", "random"):
            raise ValueError("option_order must be canonical or random")
        if self.shift not in ("none", "colour_cast", "blur", "small", "noise"):
            raise ValueError("shift must be none, colour_cast, blur, small or noise")
        if not 0.0 <= self.answer_skew <= 1.0:
            raise ValueError("answer_skew must be in [0, 1]")
        if min(self.size) < 32:
            raise ValueError(f"image size {self.size[0]}x{self.size[1]} is too small; at least 32 pixels a side")
        if self.values and self.values < 4:
            raise ValueError("values must be 0 (all) or at least 4")


@dataclass
class Drawn:
    image: Image.Image
    question: str
    options: list[str]
    answer: int
    kind: str


# ------------------------------------------------------------------------------------------ drawing


def _shape_points(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "삼각형":
        return [(cx + r * math.cos(rot + k * 2 * math.pi / 3), cy + r * math.sin(rot + k * 2 * math.pi / 3)) for k in range(3)]
    if kind == "마름모":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "별":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = rot + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if kind == "십자가":
        t = r * 0.35
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]
    raise ValueError(kind)


def draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour: tuple[int, int, int], rot: float = -math.pi / 2) -> None:
    if kind == "원":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "사각형":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=colour)
    else:
        d.polygon(_shape_points(kind, cx, cy, r, rot), fill=colour)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


class Painter:
    def __init__(self, rng: random.Random, cfg: SynthConfig) -> None:
        self.rng = rng
        self.cfg = cfg

    def canvas(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        w, h = self.cfg.size
        if self.rng.random() < 0.5:
            w, h = h, w
        bg = tuple(self.rng.randint(215, 250) for _ in range(3))
        img = Image.new("RGB", (w, h), bg)  # type: ignore[arg-type]
        return img, ImageDraw.Draw(img)

    def radius(self, img: Image.Image, frac: tuple[float, float]) -> float:
        scale = 0.55 if self.cfg.shift == "small" else 1.0
        return min(img.size) * self.rng.uniform(*frac) * scale

    def colour(self, exclude: Sequence[str] = ()) -> str:
        return self.rng.choice([c for c in COLOURS if c not in exclude])

    def finish(self, img: Image.Image) -> Image.Image:
        shift = self.cfg.shift
        if shift == "colour_cast":
            r, g, b = img.split()
            img = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.0 + 35))), g, b.point(lambda v: int(v * 0.8))))
        elif shift == "blur":
            img = img.filter(ImageFilter.GaussianBlur(radius=min(img.size) / 60))
        elif shift == "noise":
            noise = Image.effect_noise(img.size, 40).convert("RGB")
            img = Image.blend(img, noise, 0.25)
        return img


def _single(p: Painter, kind: str, answer_value: str) -> Image.Image:
    img, d = p.canvas()
    w, h = img.size
    if kind == "colour":
        r = p.radius(img, (0.25, 0.38))
        draw_shape(d, p.rng.choice(SHAPES), w / 2 + p.rng.uniform(-0.1, 0.1) * w, h / 2 + p.rng.uniform(-0.1, 0.1) * h, r, COLOURS[answer_value])
    elif kind == "shape":
        r = p.radius(img, (0.28, 0.4))
        draw_shape(d, answer_value, w / 2, h / 2, r, COLOURS[p.colour()])
    elif kind == "position":
        q = POSITIONS.index(answer_value)
        r = p.radius(img, (0.14, 0.2))
        cx = (0.25 if q % 2 == 0 else 0.75) * w + p.rng.uniform(-0.05, 0.05) * w
        cy = (0.25 if q < 2 else 0.75) * h + p.rng.uniform(-0.05, 0.05) * h
        draw_shape(d, p.rng.choice(SHAPES), cx, cy, r, COLOURS[p.colour()])
    elif kind == "count":
        n = COUNTS.index(answer_value) + 1
        cells = [(i, j) for i in range(3) for j in range(2)]
        p.rng.shuffle(cells)
        colour = COLOURS[p.colour()]
        for i, j in cells[:n]:
            r = min(w / 3, h / 2) * p.rng.uniform(0.28, 0.38) * (0.7 if p.cfg.shift == "small" else 1.0)
            cx = (i + 0.5) * w / 3 + p.rng.uniform(-0.05, 0.05) * w
            cy = (j + 0.5) * h / 2 + p.rng.uniform(-0.05, 0.05) * h
            draw_shape(d, p.rng.choice(SHAPES), cx, cy, r, colour)
    elif kind in ("digit", "letter"):
        size = int(min(w, h) * (0.45 if p.cfg.shift == "small" else 0.75))
        font = _font(size)
        colour = COLOURS[p.colour(exclude=("노란색", "하늘색", "분홍색"))]
        d.text((w / 2, h / 2), answer_value, fill=colour, font=font, anchor="mm")
    else:
        raise ValueError(kind)
    return p.finish(img)


def _absent(p: Painter, answer_value: str, present: Sequence[str]) -> Image.Image:
    img, d = p.canvas()
    w, h = img.size
    slots = [(0.25, 0.3), (0.75, 0.3), (0.5, 0.72)]
    p.rng.shuffle(slots)
    for colour, (fx, fy) in zip(present, slots):
        r = min(w, h) * p.rng.uniform(0.15, 0.2) * (0.6 if p.cfg.shift == "small" else 1.0)
        draw_shape(d, p.rng.choice(SHAPES), fx * w, fy * h, r, COLOURS[colour])
    return p.finish(img)


# ------------------------------------------------------------------------------------------ options


def _canonical_options(rng: random.Random, vocab: Sequence[str], letter: int) -> tuple[list[str], str]:
    """Pick an answer and 3 distractors so that, in vocabulary order, the answer is option ``letter``."""
    n = len(vocab)
    answer_idx = rng.randint(letter, n - 4 + letter)
    below = rng.sample(range(answer_idx), letter)
    above = rng.sample(range(answer_idx + 1, n), 3 - letter)
    idx = sorted(below + above + [answer_idx])
    return [vocab[i] for i in idx], vocab[answer_idx]


def make_question(rng: random.Random, cfg: SynthConfig, kind: str, letter: int) -> Drawn:
    p = Painter(rng, cfg)
    vocab = VOCAB[kind][: cfg.values] if cfg.values else VOCAB[kind]
    question = rng.choice(QUESTIONS[kind])
    # In random order the answer's value must not predict its letter (with four values, drawing it for the
    # target letter would tie "red" to "a" and a model could score by mapping pictures to letters), so the
    # value is drawn for an independent letter and moved to the target letter after shuffling.
    draw = letter if cfg.option_order == "canonical" else rng.randrange(4)
    if kind == "position":
        options = list(POSITIONS)
        answer_value = POSITIONS[draw]
    else:
        options, answer_value = _canonical_options(rng, vocab, draw)
    if kind == "absent":
        present = [o for o in options if o != answer_value]
        image = _absent(p, answer_value, present)
    else:
        image = _single(p, kind, answer_value)
    answer = options.index(answer_value)
    if cfg.option_order == "random":
        rng.shuffle(options)
        # Keep the drawn letter (balanced, or skewed by answer_skew): move the answer there.
        j = options.index(answer_value)
        options[j], options[letter] = options[letter], options[j]
        answer = letter
    return Drawn(image, question, options, answer, kind)


# ------------------------------------------------------------------------------------------ dataset


def _letters(rng: random.Random, n: int, skew: float) -> list[int]:
    """Exactly balanced a-d (then shuffled); with ``skew`` a fraction of rows forced to 'a'."""
    letters = [i % 4 for i in range(n)]
    rng.shuffle(letters)
    if skew > 0:
        for i in rng.sample(range(n), round(n * skew)):
            letters[i] = 0
    return letters


def generate_split(
    out: Path,
    split: str,
    n: int,
    cfg: SynthConfig,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    rng = random.Random(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    rows = []
    width = max(4, len(str(n)))
    letters = _letters(rng, n, cfg.answer_skew if split == "train" else 0.0)
    for i in range(n):
        kind = cfg.kinds[i % len(cfg.kinds)]
        item_rng = random.Random(rng.getrandbits(64))
        drawn = make_question(item_rng, cfg, kind, letters[i])
        rid = f"{split}_{i + 1:0{width}d}"
        rel = f"{split}/{rid}.jpg"
        try:
            drawn.image.save(out / rel, format="JPEG", quality=cfg.jpeg_quality)
        except OSError as e:
            if disk_problem(e):
                raise disk_error(e, out / rel) from None
            raise
        rows.append(
            {"id": rid, "path": rel, "question": drawn.question, **dict(zip(LETTERS, drawn.options)), "answer": LETTERS[drawn.answer], "kind": kind}
        )
        if progress:
            progress(1)
    return pd.DataFrame(rows)


def synthesize(out: str | Path, cfg: SynthConfig | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Path]:
    """Write train.csv, test.csv, test_labels.csv and sample_submission.csv with their images under ``out``.

    ``kind`` is an extra column in train.csv and test_labels.csv (the competition format allows extra
    columns; mcvqa ignores it when reading, the report uses it for per-kind accuracy).
    """
    cfg = cfg or SynthConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["id", "path", "question", *LETTERS]
    paths: dict[str, Path] = {}
    # The CSVs appear together once every image is on disk: a full disk leaves no CSV pointing at missing images.
    with Staged() as staged:
        if cfg.train:
            train = generate_split(out, "train", cfg.train, cfg, cfg.seed * 1000 + 1, progress)
            paths["train"] = staged.csv(out / "train.csv", train[cols + ["answer", "kind"]])
        if cfg.test:
            test = generate_split(out, "test", cfg.test, cfg, cfg.seed * 1000 + 2, progress)
            paths["test"] = staged.csv(out / "test.csv", test[cols])
            paths["test_labels"] = staged.csv(out / "test_labels.csv", test[cols + ["answer", "kind"]])
            paths["sample_submission"] = staged.csv(out / "sample_submission.csv", pd.DataFrame({"id": test["id"], "answer": ""}))
    return paths


def corpus_lines() -> list[str]:
    """Text a tiny tokenizer should know: every synthetic question and option value."""
    lines = [q for qs in QUESTIONS.values() for q in qs]
    lines += [v for vocab in VOCAB.values() for v in vocab]
    return lines
