"""Questions -> token ids and pixels, and batches of them.

:class:`Encoder` turns an :class:`~mcvqa.data.Item` into an :class:`Example` whose token ids are split into
the cacheable segments described in :mod:`mcvqa.prompts`; :func:`collate` right-pads a list of examples into
a :class:`Batch`. Right padding with the answer read at each row's own last real token means padding can
never move the answer position, and a causal model never lets a real token see a pad.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from mcvqa.config import ImageConfig, environment
from mcvqa.data import Item
from mcvqa.errors import ImageError
from mcvqa.images import load_image, load_prepared, prepare
from mcvqa import families
from mcvqa.families import Family
from mcvqa.prompts import Frame, Prompt
from mcvqa.runtime import to_device


@dataclass
class Loaded:
    """A question with its image decoded, as the engine hands it to a method that encodes for itself (views, TENT,
    SAR, TPT, ZERO, generate). ``image`` is what plain scoring sees; ``raw`` the decoded image before letterboxing,
    when asked for; ``bad_image`` why a blank stands in for an unreadable one (None when the image is fine)."""

    item: Item
    image: Image.Image
    raw: Image.Image | None = None
    bad_image: str | None = None

    @property
    def id(self) -> str:
        return self.item.id


@dataclass
class Example:
    """One question, tokenized. ``suffix`` = image + question + options; the answer is read at its last token."""

    id: str
    image_ids: list[int]
    question_ids: list[int]
    option_ids: list[int]
    vision: dict[str, torch.Tensor]
    """The image's tensors as the family's processor makes them (Qwen: pixel_values, image_grid_thw)."""
    image_types: list[int]
    """Per image token, its multimodal type (1 image content, 0 markers around it): the model's mm_token_type_ids."""
    label: int | None = None
    bad_image: str | None = None
    """Why the real image could not be used (a blank stood in for it), or None."""

    @property
    def suffix_ids(self) -> list[int]:
        return self.image_ids + self.question_ids + self.option_ids


@dataclass
class OrderedExample:
    """One question with several orderings of its options sharing one image + question prefix."""

    id: str
    image_ids: list[int]
    question_ids: list[int]
    option_variants: list[list[int]]
    """Token ids of the options segment for each order in ``orders``."""
    orders: list[tuple[int, ...]]
    """``orders[v][j]`` = original index of the option shown at letter ``j`` in variant ``v``."""
    vision: dict[str, torch.Tensor]
    image_types: list[int]
    label: int | None = None
    bad_image: str | None = None

    def variant(self, v: int) -> Example:
        """Order ``v`` as a plain example (for families whose rows cannot hold several segments)."""
        return Example(self.id, self.image_ids, self.question_ids, self.option_variants[v], self.vision, self.image_types, self.label, self.bad_image)


def cyclic_orders(k: int = 4) -> list[tuple[int, ...]]:
    """The ``k`` cyclic rotations of (0, 1, 2, 3): every option visits every letter once when k = 4."""
    return [tuple((j + s) % 4 for j in range(4)) for s in range(k)]


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor
    """(B, S) right-padded token ids: the suffix, or prefix + suffix when ``prefix_len`` > 0."""
    mm_token_type_ids: torch.Tensor
    """(B, S) 1 at image content tokens, 0 elsewhere (Qwen's M-RoPE index and Gemma's image blocks need it)."""
    lengths: torch.Tensor
    """(B,) real tokens per row; the answer is predicted at ``lengths - 1``."""
    vision: dict[str, torch.Tensor]
    """Every row's image tensors, concatenated along dim 0 (see :func:`cat_vision`)."""
    vision_rows: dict[str, list[int]] = field(default_factory=dict)
    """Per vision tensor, how many of its dim-0 rows each question owns (to cut a batch in two)."""
    labels: torch.Tensor | None = None
    """(B,) option index 0-3 of the right answer, when known."""
    prefix_len: int = 0
    """Tokens of the shared prefix included at the start of every row (0: the prefix comes from a cache)."""
    bad_images: list[str | None] = field(default_factory=list)
    host: Batch | None = field(default=None, repr=False, compare=False)
    """The batch this one was moved from (see :meth:`to`): what is read on the host (M-RoPE positions, image grids,
    row lengths) is read there, so the GPU is never waited for before the batch's kernels are queued."""

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else to_device(t, device)

        return replace(
            self,
            input_ids=mv(self.input_ids),
            mm_token_type_ids=mv(self.mm_token_type_ids),
            lengths=mv(self.lengths),
            vision={k: to_device(v, device) for k, v in self.vision.items()},
            labels=mv(self.labels),
            host=self.host if self.host is not None else (self if self.input_ids.device.type == "cpu" else None),
        )

    def pin_memory(self) -> Batch:
        """This batch in page-locked host memory. The DataLoader's ``pin_memory`` thread calls it (it pins tensors,
        mappings and sequences itself, and leaves any other object alone unless it has this method), so the main
        thread's :meth:`to` queues its copies without waiting for the GPU."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return replace(
            self,
            input_ids=pin(self.input_ids),
            mm_token_type_ids=pin(self.mm_token_type_ids),
            lengths=pin(self.lengths),
            vision={k: v.pin_memory() for k, v in self.vision.items()},
            labels=pin(self.labels),
        )

    @property
    def on_host(self) -> Batch:
        """The CPU copy of this batch (itself when it is one)."""
        return self.host if self.host is not None else self

    def rows(self, a: int, b: int) -> Batch:
        """Questions ``a:b`` as a batch of their own, trimmed to their longest row."""
        width = int(self.on_host.lengths[a:b].max())
        vision = {}
        for k, v in self.vision.items():
            counts = self.vision_rows.get(k) or [v.shape[0] // len(self)] * len(self)
            vision[k] = v[sum(counts[:a]) : sum(counts[:b])]
        return replace(
            self,
            ids=self.ids[a:b],
            input_ids=self.input_ids[a:b, :width],
            mm_token_type_ids=self.mm_token_type_ids[a:b, :width],
            lengths=self.lengths[a:b],
            vision=vision,
            vision_rows={k: c[a:b] for k, c in self.vision_rows.items()},
            labels=None if self.labels is None else self.labels[a:b],
            bad_images=self.bad_images[a:b],
            host=None if self.host is None else self.host.rows(a, b),
        )

    def __len__(self) -> int:
        return len(self.ids)


def cat_vision(parts: Sequence[dict[str, torch.Tensor]], pad: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Concatenate per-image tensors along dim 0; where images differ in size (AnyRes tiles, Gemma's patch
    lists), dim 1 is right-padded to the longest with the family's pad value (0, or -1 for position ids)."""
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, list[int]] = {}
    for k in parts[0] if parts else {}:
        ts = [p[k] for p in parts]
        if ts[0].dim() >= 2 and len({t.shape[1:] for t in ts}) > 1:
            width = max(t.shape[1] for t in ts)
            value = (pad or {}).get(k, 0)
            ts = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]), value=value) for t in ts]
        out[k] = torch.cat(ts, dim=0)
        rows[k] = [t.shape[0] for t in ts]
    return out, rows


class Encoder:
    """Builds token segments and pixel tensors for one model's processor and one prompt.

    Picklable (tokenizer and image processor are), so it can run inside DataLoader workers.
    """

    def __init__(self, processor: Any, prompt: Prompt, image_cfg: ImageConfig, family: Family | None = None,
                 pixel_dtype: torch.dtype | None = None) -> None:
        self.prompt = prompt
        self.pixel_dtype = pixel_dtype
        """Floating image tensors are cast to this in the workers (see :meth:`Family.pixel_dtype`); None keeps them."""
        self.image_cfg = image_cfg
        self.processor = processor
        self.family = family or families.for_processor(processor)
        self.tokenizer = processor.tokenizer
        self.frame = Frame.from_processor(processor, prompt.system, self.family.image_placeholder, self.family.template_kwargs)
        tok = self.tokenizer
        self.image_token_id = self.family.image_token_id(tok, getattr(self.family, "config", None))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        self.prefix_ids: list[int] = self._tok(self.frame.head)
        self._blank: Image.Image | None = None
        self._image_len: int | None = None

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    # -- segments ---------------------------------------------------------------------------------------

    def _question_text(self, question: str) -> str:
        return self.frame.between + self.prompt.question_text(question)

    def _options_text(self, options: Sequence[str]) -> str:
        return self.prompt.options_text(list(options)) + self.frame.tail

    def question_ids(self, question: str) -> list[int]:
        return self._tok(self._question_text(question))

    def option_ids(self, options: Sequence[str]) -> list[int]:
        return self._tok(self._options_text(options))

    def text_lengths(self, items: Sequence[Item]) -> list[int]:
        """Each item's question and option tokens, as :meth:`question_ids` and :meth:`option_ids` count them, in two
        batched tokenizer calls (the fast tokenizer encodes a list on all cores) rather than two calls an item."""
        def counts(texts: list[str]) -> list[int]:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            return [len(x) if t else 0 for t, x in zip(texts, ids)]

        questions = counts([self._question_text(it.question) for it in items])
        options = counts([self._options_text(it.options) for it in items])
        return [q + o for q, o in zip(questions, options)]

    def pixels(self, image: Image.Image) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """The image segment's token ids, their multimodal types and the image tensors, for a prepared image."""
        ids, types, tensors = self.family.encode_image(self.processor, image)
        if self.pixel_dtype is not None:
            tensors = {k: v.to(self.pixel_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        return ids, types, tensors

    def collate(self, examples: Sequence[Example], with_prefix: bool = False) -> Batch:
        return collate(examples, self.pad_id, self.prefix_ids if with_prefix else None, self.family.vision_pad)

    def image_len(self) -> int:
        """Tokens of one letterboxed image (every letterboxed image has the same count)."""
        if self._image_len is None:
            self._image_len = len(self.pixels(self.blank_image())[0])
        return self._image_len

    def blank_image(self) -> Image.Image:
        """Stand-in for an unreadable image (``--on-bad-image skip``): mid grey, the configured shape."""
        if self._blank is None:
            size = self.image_cfg.size if self.image_cfg.mode == "letterbox" else 448
            self._blank = prepare(Image.new("RGB", (size, size), (128, 128, 128)), self.image_cfg)
        return self._blank

    def load_image(self, item: Item, on_bad_image: str = "fail") -> tuple[Image.Image, str | None]:
        """The image as the model sees it; under ``skip`` a blank stands in for an unreadable one (and the reason is
        returned), under ``fail`` the :class:`ImageError` propagates."""
        try:
            return load_prepared(item.image, self.image_cfg), None
        except ImageError as e:
            if on_bad_image == "fail":
                raise
            return self.blank_image(), e.problem

    def load(self, item: Item, raw: bool = False) -> Loaded:
        """``item`` with its image decoded as plain scoring sees it, and with ``raw`` also before letterboxing (where
        augmented views start). Never raises for a bad image: a blank stands in and ``bad_image`` says why, for the
        engine to apply the run's policy (picklable: it runs in DataLoader workers)."""
        try:
            if raw:
                full = load_image(item.image, self.image_cfg.max_image_pixels)
                return Loaded(item, prepare(full, self.image_cfg), full)
            return Loaded(item, load_prepared(item.image, self.image_cfg))
        except ImageError as e:
            return Loaded(item, self.blank_image(), self.blank_image() if raw else None, e.problem)

    def _shared(self, item: Item, image: Image.Image | None, on_bad_image: str) -> dict[str, Any]:
        """What every encoding of ``item`` shares: its image segment, pixels and question."""
        bad = None
        if image is None:
            image, bad = self.load_image(item, on_bad_image)
        image_ids, image_types, vision = self.pixels(image)
        return dict(
            id=item.id, image_ids=image_ids, question_ids=self.question_ids(item.question),
            vision=vision, image_types=image_types, label=item.answer, bad_image=bad,
        )

    def encode(self, item: Item, image: Image.Image | None = None, on_bad_image: str = "fail") -> Example:
        """Tokenize ``item`` with its options in the given order. ``image`` (already prepared) skips loading."""
        return Example(**self._shared(item, image, on_bad_image), option_ids=self.option_ids(item.options))

    def encode_orders(self, item: Item, orders: Sequence[Sequence[int]], image: Image.Image | None = None, on_bad_image: str = "fail") -> OrderedExample:
        """Tokenize ``item`` once, with one options segment per order (for option-order averaging)."""
        return OrderedExample(
            **self._shared(item, image, on_bad_image),
            option_variants=[self.option_ids([item.options[k] for k in order]) for order in orders],
            orders=[tuple(o) for o in orders],
        )

    def full_text(self, item: Item, image_text: str | None = None) -> str:
        """The whole conversation as one string; ``image_text`` replaces the template's image placeholder."""
        user = self.prompt.user_text(item.question, item.options)
        return self.frame.render(user, image_text)


def token_lengths(items: Sequence[Item], encoder: Encoder) -> list[int]:
    """Suffix length of each item (text tokens + image tokens), for length-grouped batching."""
    from mcvqa.images import FACTOR, native_size, open_image

    cfg = encoder.image_cfg
    out = []
    for it, n_text in zip(items, encoder.text_lengths(items)):
        n_img = None
        if cfg.mode != "letterbox":
            with open_image(it.image, cfg.max_image_pixels) as im:
                w, h = native_size(*im.size, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)
            n_img = encoder.family.native_image_tokens(w, h, FACTOR)
        if n_img is None:
            n_img = encoder.image_len()  # letterboxed: every image the same; else the family cannot tell cheaply (sorting only)
        out.append(n_img + n_text)
    return out


def collate(examples: Sequence[Example], pad_id: int, prefix_ids: Sequence[int] | None = None, vision_pad: dict[str, float] | None = None) -> Batch:
    """Right-pad examples into a batch. With ``prefix_ids`` every row starts with the prefix (the uncached path).
    Each example carries its image tokens' multimodal types, so no image token id is needed here."""
    prefix = list(prefix_ids or [])
    rows = [prefix + ex.suffix_ids for ex in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mm = torch.zeros((len(rows), width), dtype=torch.int32)
    for i, (r, ex) in enumerate(zip(rows, examples)):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mm[i, len(prefix) : len(prefix) + len(ex.image_types)] = torch.tensor(ex.image_types, dtype=torch.int32)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    labels = None
    if all(ex.label is not None for ex in examples):
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    vision, vision_rows = cat_vision([ex.vision for ex in examples], vision_pad)
    return Batch(
        ids=[ex.id for ex in examples],
        input_ids=input_ids,
        mm_token_type_ids=mm,
        lengths=lengths,
        vision=vision,
        vision_rows=vision_rows,
        labels=labels,
        prefix_len=len(prefix),
        bad_images=[ex.bad_image for ex in examples],
    )


class ItemDataset(torch.utils.data.Dataset):
    """Items encoded lazily, so image decoding runs in DataLoader workers, overlapped with the model."""

    def __init__(self, items: Sequence[Item], encoder: Encoder, on_bad_image: str = "fail") -> None:
        self.items = list(items)
        self.encoder = encoder
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        return self.encoder.encode(self.items[i], on_bad_image=self.on_bad_image)


class Collator:
    """Picklable collate_fn for DataLoader."""

    def __init__(self, encoder: Encoder, with_prefix: bool = False) -> None:
        self.pad_id = encoder.pad_id
        self.image_token_id = encoder.image_token_id
        self.prefix_ids = encoder.prefix_ids if with_prefix else None
        self.vision_pad = encoder.family.vision_pad

    def __call__(self, examples: Sequence[Example]) -> Batch:
        return collate(examples, self.pad_id, self.prefix_ids, self.vision_pad)


def resolve_num_workers(requested: int) -> int:
    """``-1`` (auto): on a GPU, decode images in up to 8 worker processes (per process under a launcher).
    Decoding, letterboxing and the image processor of one photo cost a sizeable fraction of a GPU batch's time
    (BENCHMARKS.md, "CPU: preparing one question"): in the main process that time would sit between GPU batches
    (predict) or between launch-bound QLoRA steps (train). On CPU, 0: workers would compete with the model for
    the same cores."""
    if requested >= 0:
        return requested
    if not torch.cuda.is_available():
        return 0
    per_process = (os.cpu_count() or 1) // environment().local_world_size
    return max(0, min(8, per_process - 1))
