"""Scoring: one forward pass per batch, the answer position only, a softmax over the letter tokens.

Knows logits, letter ids and key/value caches; not files. The forward used here (:func:`answer_hidden`)
is the same one training differentiates through, so "what training optimises" and "what predict reads"
cannot drift apart.

The shared system prompt is run once per model (per weight state) and its keys/values are reused for
every batch through :class:`PrefixCache`, a read-only cache: it returns ``cat(prefix, new)`` but never
stores anything, so it is safe under gradient checkpointing (a recomputed layer reads the same prefix)
and one prefix serves any batch size. A causal prefix does not depend on what follows, so this is exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from mcvqa.config import LETTERS
from mcvqa.errors import ModelError
from mcvqa.features import Batch, Encoder, OrderedExample
from mcvqa.model import core_and_head, decoder_layers

# ------------------------------------------------------------------------------------------ letter tokens


@dataclass(frozen=True)
class LetterTokens:
    """Token ids that spell each letter as a single token (``a``, `` a``, ``A``, `` A``)."""

    variants: tuple[tuple[int, ...], ...]
    """Per letter, every single-token form the tokenizer has; their probabilities are summed."""
    target: tuple[int, ...]
    """Per letter, the bare lowercase token the model is trained to emit."""

    @property
    def all_ids(self) -> list[int]:
        return [i for v in self.variants for i in v]


def letter_tokens(tokenizer: Any) -> LetterTokens:
    """Resolve the letter tokens and check each letter has a single-token form (fails at start-up, not mid-run)."""
    variants: list[tuple[int, ...]] = []
    target: list[int] = []
    taken: set[int] = set()
    for letter in LETTERS:
        forms: list[int] = []
        for form in (letter, " " + letter, letter.upper(), " " + letter.upper()):
            ids = tokenizer.encode(form, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in forms:
                if ids[0] in taken:
                    raise ModelError(f"tokenizer maps two different letters to token id {ids[0]}")
                forms.append(ids[0])
        bare = tokenizer.encode(letter, add_special_tokens=False)
        if len(bare) != 1:
            raise ModelError(f"tokenizer has no single token for the letter {letter!r}: the answer cannot be scored")
        variants.append(tuple(forms))
        target.append(bare[0])
        taken.update(forms)
    return LetterTokens(tuple(variants), tuple(target))


def letter_logprobs(letter_logits: torch.Tensor, letters: LetterTokens) -> torch.Tensor:
    """(B, n_variant_ids) logits at the answer position -> (B, 4) log-probabilities over a-d.

    ``letter_logits`` columns follow ``letters.all_ids``. Each letter's score is the log-sum-exp of its
    forms (the probability mass the model puts on that letter however it spells it); then a 4-way softmax.
    """
    scores = []
    col = 0
    for forms in letters.variants:
        scores.append(torch.logsumexp(letter_logits[:, col : col + len(forms)].float(), dim=-1))
        col += len(forms)
    return torch.log_softmax(torch.stack(scores, dim=-1), dim=-1)


def allow_prefix_cache_under_checkpointing(model: Any) -> None:
    """Tell transformers our cache is read-only, so checkpointed layers may keep it (see module doc)."""
    for layer in decoder_layers(model):
        layer._can_checkpoint_with_cache = True


# ------------------------------------------------------------------------------------------ prefix cache


class PrefixLayer(DynamicLayer):
    """Read-only layer cache: returns ``cat(prefix, new)``; optionally records the newest keys/values.

    Recording overwrites instead of appending, so a checkpointed layer recomputed in the backward pass
    leaves the same state behind.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, record: bool = False):
        super().__init__()
        self.prefix_keys = keys
        self.prefix_values = values
        self.record = record
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record:
            self.recorded = (key_states, value_states)
        if self.prefix_keys is None:
            return key_states, value_states
        b = key_states.shape[0]
        pk, pv = self.prefix_keys, self.prefix_values
        assert pv is not None
        if pk.shape[0] != b:  # one prefix serves every row: broadcast, cat materialises
            pk = pk.expand(b, -1, -1, -1)
            pv = pv.expand(b, -1, -1, -1)
        return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return 0 if self.prefix_keys is None else int(self.prefix_keys.shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class PrefixCache(Cache):
    def __init__(self, layers: list[PrefixLayer]):
        super().__init__(layers=layers)  # type: ignore[arg-type]

    @classmethod
    def recorder(cls, num_layers: int, prefix: PrefixKV | None = None) -> PrefixCache:
        if prefix is None:
            return cls([PrefixLayer(record=True) for _ in range(num_layers)])
        return cls([PrefixLayer(k, v, record=True) for k, v in zip(prefix.keys, prefix.values)])

    @classmethod
    def reading(cls, prefix: PrefixKV) -> PrefixCache:
        return cls([PrefixLayer(k, v) for k, v in zip(prefix.keys, prefix.values)])

    def recorded(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for layer in self.layers:
            assert isinstance(layer, PrefixLayer) and layer.recorded is not None
            keys.append(layer.recorded[0])
            values.append(layer.recorded[1])
        return keys, values


@dataclass
class PrefixKV:
    """Keys/values of a shared token prefix, batch dimension 1 (or B for per-row prefixes)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int


def mrope_positions(core: Any, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, offset: int) -> torch.Tensor:
    """(4, B, S) position ids: row 0 sequence positions (for masks), rows 1-3 Qwen-VL's M-RoPE (t, h, w).

    Computed on the suffix alone and shifted by the prefix length: the prefix is plain text, whose M-RoPE
    positions are ``0..P-1`` on all three axes, so this equals the index of the whole sequence.
    """
    b, s = input_ids.shape
    if image_grid_thw is not None and bool(mm_token_type_ids.any()):
        vis, _ = core.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=None)
    else:
        vis = torch.arange(s, device=input_ids.device).view(1, 1, s).expand(3, b, s)
    text = torch.arange(s, device=input_ids.device).view(1, 1, s).expand(1, b, s)
    return torch.cat([text, vis], dim=0) + offset


def compute_prefix(model: Any, prefix_ids: Sequence[int], device: torch.device | str | None = None) -> PrefixKV:
    """Run the shared prefix once (batch 1). Differentiable when grad is enabled (training)."""
    core, _ = core_and_head(model)
    device = device or next(core.parameters()).device
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
    mm = torch.zeros_like(ids, dtype=torch.int32)
    cache = PrefixCache.recorder(len(core.language_model.layers))
    core(input_ids=ids, position_ids=mrope_positions(core, ids, mm, None, 0), cache=cache, use_cache=False)
    keys, values = cache.recorded()
    return PrefixKV(keys, values, len(prefix_ids))


def answer_hidden(model: Any, batch: Batch, prefix: PrefixKV | None = None) -> torch.Tensor:
    """Final hidden state (after the last norm) at each row's answer position: (B, hidden).

    ``batch`` holds the suffix only when ``prefix`` is given, or the whole sequence (``batch.prefix_len`` > 0).
    No attention mask is passed: with right padding, causal attention already keeps every real token
    from seeing a pad, and leaving the mask out lets SDPA take its fused causal kernels.
    """
    core, _ = core_and_head(model)
    if prefix is not None and batch.prefix_len:
        raise ValueError("batch already contains the prefix")
    offset = prefix.length if prefix is not None else 0
    positions = mrope_positions(core, batch.input_ids, batch.mm_token_type_ids, batch.image_grid_thw, offset)
    cache = PrefixCache.reading(prefix) if prefix is not None else None
    out = core(
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids,
        position_ids=positions,
        cache=cache,
        use_cache=False,
    )
    hidden = out.last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch.lengths.to(hidden.device) - 1]


def packed_answer_hidden(model: Any, batch: Batch, prefix_ids: Sequence[int]) -> torch.Tensor:
    """Like :func:`answer_hidden` with a shared prefix, but prefix and every row go through ONE forward pass.

    The batch is packed into a single sequence ``[prefix, row 1, row 2, ...]`` (padding dropped) with a
    mask that lets each row see the prefix and its own earlier tokens only. Each layer then runs one matrix
    product over ``P + sum(len)`` tokens instead of one for the prefix and one for the rows - which matters
    for 4-bit weights, dequantised once per matrix product. Exact: same keys, queries and positions.
    """
    core, _ = core_and_head(model)
    device = batch.input_ids.device
    p = len(prefix_ids)
    b = batch.input_ids.shape[0]
    lengths = batch.lengths.tolist()
    pos = mrope_positions(core, batch.input_ids, batch.mm_token_type_ids, batch.image_grid_thw, p)
    prefix_t = torch.tensor(list(prefix_ids), dtype=torch.long, device=device)
    ids = torch.cat([prefix_t] + [batch.input_ids[i, : lengths[i]] for i in range(b)])[None]
    mm = torch.cat([torch.zeros(p, dtype=batch.mm_token_type_ids.dtype, device=device)] + [batch.mm_token_type_ids[i, : lengths[i]] for i in range(b)])[None]
    prefix_pos = torch.arange(p, device=device).view(1, p).expand(4, p)
    positions = torch.cat([prefix_pos] + [pos[:, i, : lengths[i]] for i in range(b)], dim=1)[:, None, :]
    segment = torch.cat([torch.zeros(p, dtype=torch.long, device=device)] + [torch.full((n,), i + 1, dtype=torch.long, device=device) for i, n in enumerate(lengths)])
    t = segment.shape[0]
    idx = torch.arange(t, device=device)
    allowed = (idx[None, :] <= idx[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    out = core(
        input_ids=ids,
        attention_mask=allowed[None, None],  # 4D boolean mask: transformers passes it through as is
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=mm,
        position_ids=positions,
        use_cache=False,
    )
    ends = p + torch.cumsum(batch.lengths.to(device), 0) - 1
    return out.last_hidden_state[0, ends]


def head_rows(head: torch.nn.Module, hidden: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits of selected vocabulary rows only: 4-16 dot products instead of the whole vocabulary."""
    weight = getattr(head, "weight", None)
    if isinstance(head, torch.nn.Linear) and weight is not None and weight.dtype.is_floating_point and weight.dim() == 2:
        idx = torch.tensor(list(token_ids), device=weight.device)
        bias = head.bias[idx] if head.bias is not None else None
        return F.linear(hidden.to(weight.dtype), weight[idx], bias)
    return head(hidden)[:, list(token_ids)]


# ------------------------------------------------------------------------------------------ scorer


class Scorer:
    """Letter probabilities for batches of questions, with the system-prompt cache managed for you.

    Call :meth:`invalidate` after changing weights (test-time adaptation) so the prefix is recomputed.
    """

    def __init__(self, model: Any, encoder: Encoder, *, prefix_cache: bool = True) -> None:
        self.model = model
        self.encoder = encoder
        self.letters = letter_tokens(encoder.tokenizer)
        self.use_prefix_cache = prefix_cache
        self._prefix: PrefixKV | None = None
        core, self.head = core_and_head(model)
        self.device = next(core.parameters()).device

    def invalidate(self) -> None:
        self._prefix = None

    def prefix(self) -> PrefixKV:
        if self._prefix is None:
            with torch.no_grad():
                self._prefix = compute_prefix(self.model, self.encoder.prefix_ids, self.device)
        return self._prefix

    def logprobs(self, batch: Batch, grad: bool = False, prefix_grad: bool = True) -> torch.Tensor:
        """(B, 4) float32 log-probabilities over a-d. ``batch`` must hold suffixes (see :class:`~mcvqa.features.Collator`).

        With ``grad``, the prefix is recomputed with gradients too unless ``prefix_grad`` is False (when
        what is being tuned does not touch it, e.g. a soft prompt after the image).
        """
        batch = batch.to(self.device)
        with torch.set_grad_enabled(grad):
            if self.use_prefix_cache and not batch.prefix_len:
                prefix = self.prefix() if not (grad and prefix_grad) else compute_prefix(self.model, self.encoder.prefix_ids, self.device)
                hidden = answer_hidden(self.model, batch, prefix)
            else:
                hidden = answer_hidden(self.model, batch, None)
            return letter_logprobs(head_rows(self.head, hidden, self.letters.all_ids), self.letters)

    def logprobs_orders(self, examples: Sequence[OrderedExample], grad: bool = False) -> torch.Tensor:
        """(B, V, 4) log-probabilities of each question under each option order, indexed by ORIGINAL option.

        The image and question are run once per question and shared by its V orderings (two-level prefix:
        system prompt -> image + question -> options). Exact: equal to scoring each permuted question alone.
        """
        with torch.set_grad_enabled(grad):
            prefix = self.prefix() if not grad else compute_prefix(self.model, self.encoder.prefix_ids, self.device)
            lp = shared_prefix_logprobs(self.model, self.encoder, examples, prefix, self.letters, self.head, self.device)
        out = torch.empty_like(lp)
        for b, ex in enumerate(examples):
            for v, order in enumerate(ex.orders):
                out[b, v, list(order)] = lp[b, v]  # the option shown at letter j is original option order[j]
        return out

    @property
    def with_prefix_in_batch(self) -> bool:
        """Whether batches must carry the prefix tokens themselves (cache off)."""
        return not self.use_prefix_cache


def shared_prefix_logprobs(
    model: Any,
    encoder: Encoder,
    examples: Sequence[OrderedExample],
    prefix: PrefixKV,
    letters: LetterTokens,
    head: torch.nn.Module,
    device: torch.device,
) -> torch.Tensor:
    """(B, V, 4) letter log-probs by displayed letter, for V option segments per question (see logprobs_orders).

    One forward pass, one row per question: ``[image + question, options under order 1, ..., order V]`` after the
    cached system prompt. A mask lets each options segment see the system prompt, its question and itself only
    (never the other orders), and every segment's positions continue from the end of the question as if it came
    right after it: each segment is scored exactly as its permuted question alone would be. The image and the
    question go through the model once, their keys and values are never copied per order, and there is no
    padding inside a row (BENCHMARKS.md: 4 orders cost 1.56x one order through the CLI on an H100, was 2.5x).
    Kept as one function on purpose (83 lines): rows, positions and mask describe one packed forward and are only
    checkable together (``test_shared_question_prefix_for_option_orders_is_exact``).
    """
    core, _ = core_and_head(model)
    B, V = len(examples), len(examples[0].option_variants)
    if any(len(ex.option_variants) != V for ex in examples):
        raise ValueError("every question needs the same number of option orders")
    P = prefix.length
    # M-RoPE of image + question (real lengths) as the single-order path computes it.
    stage1 = [ex.image_ids + ex.question_ids for ex in examples]
    len1 = [len(r) for r in stage1]
    l1 = max(len1)
    ids1 = torch.full((B, l1), encoder.pad_id, dtype=torch.long)
    for i, r in enumerate(stage1):
        ids1[i, : len(r)] = torch.tensor(r)
    ids1 = ids1.to(device)
    mm1 = (ids1 == encoder.image_token_id).to(torch.int32)
    grid = torch.stack([ex.image_grid_thw for ex in examples]).to(device)
    pos1 = mrope_positions(core, ids1, mm1, grid, P)  # (4, B, l1)
    rows_ids: list[list[int]] = []
    segs: list[list[int]] = []  # 0: image + question; v + 1: options under order v; -1: padding
    steps: list[list[int]] = []  # position step after the question (segments); unused for segment 0
    for ex, n1 in zip(examples, len1):
        ids, seg, step = list(ex.image_ids + ex.question_ids), [0] * n1, [0] * n1
        for v, opt in enumerate(ex.option_variants):
            ids += opt
            seg += [v + 1] * len(opt)
            step += list(range(len(opt)))
        rows_ids.append(ids)
        segs.append(seg)
        steps.append(step)
    L = max(len(r) for r in rows_ids)
    ids = torch.full((B, L), encoder.pad_id, dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)
    step = torch.zeros((B, L), dtype=torch.long)
    for i in range(B):
        n = len(rows_ids[i])
        ids[i, :n], seg[i, :n], step[i, :n] = torch.tensor(rows_ids[i]), torch.tensor(segs[i]), torch.tensor(steps[i])
    ids, seg, step = ids.to(device), seg.to(device), step.to(device)
    n1_t = torch.tensor(len1, device=device)
    rows = torch.arange(B, device=device)
    # Segments continue where the question ends: text position P + len1 + i, M-RoPE (max so far) + 1 + i.
    next_pos = pos1[1:, rows, n1_t - 1].max(dim=0).values + 1  # (B,)
    positions = torch.stack([(P + n1_t)[:, None] + step] + [next_pos[:, None] + step] * 3)  # (4, B, L)
    positions[:, :, :l1] = torch.where((seg[:, :l1] == 0)[None], pos1, positions[:, :, :l1])
    # Who sees whom among the row's tokens: causal, and a segment sees the question and itself only.
    t = torch.arange(L, device=device)
    causal = t[None, :] <= t[:, None]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed = causal[None] & same
    allowed |= torch.eye(L, dtype=torch.bool, device=device)[None]  # padding rows see themselves (no empty softmax)
    mask = torch.cat([torch.ones((B, L, P), dtype=torch.bool, device=device), allowed], dim=-1)[:, None]
    out = core(
        input_ids=ids,
        attention_mask=mask,  # 4D boolean mask over (system prompt + row): transformers passes it through as is
        pixel_values=torch.cat([ex.pixel_values for ex in examples]).to(device),
        image_grid_thw=grid,
        mm_token_type_ids=(ids == encoder.image_token_id).to(torch.int32),
        position_ids=positions,
        cache=PrefixCache.reading(prefix),
        use_cache=False,
    )
    # The answer of order v is read at the last token of its segment.
    lengths = torch.tensor([[len(o) for o in ex.option_variants] for ex in examples], device=device)  # (B, V)
    ends = n1_t[:, None] + torch.cumsum(lengths, dim=1) - 1
    hidden = out.last_hidden_state[rows[:, None], ends].reshape(B * V, -1)
    lp = letter_logprobs(head_rows(head, hidden, letters.all_ids), letters)
    return lp.view(B, V, 4)


# ------------------------------------------------------------------------------------------ generate path


_LETTER_RE = re.compile(r"(?<![A-Za-z])([abcdABCD])(?![A-Za-z])")


def parse_letter(text: str) -> int | None:
    """The reference's parser: the first standalone a-d (either case) in the generated text."""
    m = _LETTER_RE.search(text)
    return None if m is None else LETTERS.index(m.group(1).lower())


@dataclass
class GenerateResult:
    logprobs: torch.Tensor
    """(4,) log-probabilities from the first generated step's letter scores."""
    text: str
    parsed: int | None
    """Letter parsed from the text, or None (then the argmax of the first-step letter scores is used: the counted fallback)."""


def score_generate(model: Any, encoder: Encoder, batch: Batch, max_new_tokens: int = 8) -> list[GenerateResult]:
    """The reference method: ``generate`` one question at a time, softmax of the first step's letter scores.

    Kept for comparison (``--scoring generate``). ``batch`` must include the prefix and hold one row.
    """
    if len(batch) != 1 or not batch.prefix_len:
        raise ValueError("generate scoring takes one question at a time, prefix included")
    core, _ = core_and_head(model)
    device = next(core.parameters()).device
    batch = batch.to(device)
    letters = letter_tokens(encoder.tokenizer)
    with torch.no_grad():
        out = model.generate(
            input_ids=batch.input_ids,
            attention_mask=torch.ones_like(batch.input_ids),
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            mm_token_type_ids=batch.mm_token_type_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=encoder.pad_id,
        )
    first = out.scores[0][:, letters.all_ids]
    lp = letter_logprobs(first, letters)[0].cpu()
    text = encoder.tokenizer.decode(out.sequences[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return [GenerateResult(lp, text, parse_letter(text))]


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of log-probabilities."""
    return -(logprobs.exp() * logprobs).sum(-1)


MAX_ENTROPY = math.log(4)
