"""Scoring: one forward pass per batch, the answer position only, a softmax over the letter tokens.

Knows logits, letter ids and key/value caches; not files. The forward used here (:func:`answer_hidden`)
is the same one training differentiates through, so "what training optimises" and "what predict reads"
cannot drift apart.

The shared system prompt is run once per model (per weight state) and its keys/values are reused for
every batch through :class:`PrefixCache`, a read-only cache: it returns ``cat(prefix, new)`` but never
stores anything, so it is safe under gradient checkpointing (a recomputed layer reads the same prefix)
and one prefix serves any batch size. A causal prefix does not depend on what follows, so this is exact.
Prediction's scorer keeps, per layer, the prefix already laid out for each row (:class:`PrefixRows`), so a batch
writes only its own keys and values there instead of concatenating the whole prefix again in every layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer

from mcvqa.compat import cache_kwarg
from mcvqa.config import LETTERS
from mcvqa.errors import ModelError
from mcvqa.features import Batch, Encoder, OrderedExample, cat_vision
from mcvqa import families
from mcvqa.families import Family
from mcvqa.kernels import ANSWER_ONLY, AnswerOnly, PackedRows
from mcvqa.runtime import to_device

log = logging.getLogger(__name__)

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
    for layer in families.decoder_layers(model):
        layer._can_checkpoint_with_cache = True


# ------------------------------------------------------------------------------------------ prefix cache


class PrefixRows:
    """For each attention layer, keys and values laid out for a batch's rows with the prefix's already in place:
    a batch writes its own after them and attention reads a view, where ``cat(prefix, new)`` would copy the whole
    prefix once per row in every layer, for every batch. The same values in the same order, so exact.

    Without gradients only (a tensor written in place and read again by the next batch has no place in a graph:
    training and test-time adaptation take the concatenation), and only with room for it: prediction's scorer
    (:class:`Scorer` with ``keep_rows``) keeps about 2 GiB for Qwen3-VL-8B at batch 16 while it lives. Before the
    first buffers (room for every attention layer's) and before each larger one, the device must keep
    :data:`HEADROOM` of its memory free after them (a quarter of the free host memory on a CPU); where it would not,
    or an allocation runs out of memory, or a forward does (:meth:`Scorer.logprobs`), the buffers are given back
    and every layer concatenates from then on. One batch at a time: a scorer that keeps rows is not for concurrent
    calls from several threads.
    """

    HEADROOM = 0.1
    """Share of the GPU's memory that must stay free after the buffers are made (and at least 2 GiB)."""
    STEP = 64
    """Token rows are kept in multiples of this, so batches of slightly longer questions reuse the buffers."""

    def __init__(self, kinds: list[str]):
        self.keys: list[torch.Tensor | None] = [None] * len(kinds)
        self.values: list[torch.Tensor | None] = [None] * len(kinds)
        self.attention_layers = max(1, sum(kind == "kv" for kind in kinds))
        self.declined = False

    def join(self, i: int, pk: torch.Tensor, pv: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``i``'s (keys, values) over prefix and rows, or None when the buffers are not for this call."""
        if self.declined or torch.is_grad_enabled() or pk.requires_grad:
            return None
        b, p, s = k.shape[0], pk.shape[-2], k.shape[-2]
        keys = self.keys[i]
        if keys is None or not self._fits(keys, b, p + s, k):
            shape = (b, k.shape[1], p + self.STEP * math.ceil(s / self.STEP), k.shape[-1])
            need = 2 * math.prod(shape) * k.element_size()
            first = all(x is None for x in self.keys)
            if not self._room(k, need * (self.attention_layers if first else 1)):
                self.release()
                return None
            try:
                keys, values = torch.empty(shape, dtype=k.dtype, device=k.device), torch.empty(shape, dtype=v.dtype, device=v.device)
            except torch.cuda.OutOfMemoryError:
                self.release()
                return None
            self.keys[i], self.values[i] = keys, values
            keys[:, :, :p] = pk
            values[:, :, :p] = pv
        values = self.values[i]
        assert values is not None
        keys[:b, :, p : p + s] = k
        values[:b, :, p : p + s] = v
        return keys[:b, :, : p + s], values[:b, :, : p + s]

    def release(self) -> None:
        """Give the buffers back; every layer concatenates from now on."""
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.declined = True

    @staticmethod
    def _same_kind(buf: torch.Tensor, k: torch.Tensor) -> bool:
        # An inference-mode tensor cannot be written outside inference mode (and the other way round costs nothing
        # to redo): a scorer used both ways makes its buffers again.
        return (buf.dtype == k.dtype and buf.device == k.device and buf.shape[1] == k.shape[1] and buf.shape[-1] == k.shape[-1]
                and buf.is_inference() == torch.is_inference_mode_enabled())

    def _fits(self, buf: torch.Tensor, rows: int, length: int, k: torch.Tensor) -> bool:
        return self._same_kind(buf, k) and buf.shape[0] >= rows and buf.shape[-2] >= length

    def _room(self, like: torch.Tensor, need: int) -> bool:
        """Whether ``need`` more bytes leave enough free on ``like``'s device."""
        if like.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(like.device)
            free += torch.cuda.memory_reserved(like.device) - torch.cuda.memory_allocated(like.device)  # torch's cache is free to it
            return free - need >= max(self.HEADROOM * total, 2 * 2**30)
        from mcvqa.io import available_memory

        free = available_memory()
        return free is not None and need <= free // 4


class PrefixLayer(DynamicLayer):
    """Read-only layer cache: returns ``cat(prefix, new)`` (or, with ``rows``, the same through
    :class:`PrefixRows`); optionally records the newest keys/values.

    Recording overwrites instead of appending, so a checkpointed layer recomputed in the backward pass
    leaves the same state behind.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, record: bool = False,
                 rows: PrefixRows | None = None, index: int = 0):
        super().__init__()
        self.prefix_keys = keys
        self.prefix_values = values
        self.record = record
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows = rows
        self.index = index
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
        if self.rows is not None:
            joined = self.rows.join(self.index, pk, pv, key_states, value_states)
            if joined is not None:
                return joined
        if pk.shape[0] != b:  # one prefix serves every row: broadcast, cat materialises
            pk = pk.expand(b, -1, -1, -1)
            pv = pv.expand(b, -1, -1, -1)
        return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return 0 if self.prefix_keys is None else int(self.prefix_keys.shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class _PerRow(dict):
    """The recurrent states (state index -> tensor) of a :class:`PrefixLinearLayer`: reading an entry gives the prefix's state (batch 1)
    laid out once per row of the batch being scored.

    transformers hands this tensor to the gated delta rule as ``initial_state``. Its torch fallback broadcasts a
    batch-1 state, but flash-linear-attention's kernel indexes ``initial_state`` as a dense (B, H, K, V) block: a
    batch-1 or expanded (stride 0) tensor makes it read past the allocation, an illegal memory access that kills the
    CUDA context. The copy is made on each read, so each layer holds it only while it runs (a checkpointed layer
    recomputed in the backward pass reads again), and gradients reach the prefix through ``expand``. Both ways
    transformers reads it go through ``__getitem__``: ``Cache.get_recurrent_state`` and, in older releases,
    ``layer.recurrent_states[0]``."""

    def __init__(self, state: torch.Tensor, batch: int | None):
        super().__init__({0: state})
        self.batch = batch

    def __getitem__(self, i):  # type: ignore[override]
        state = super().__getitem__(i)
        if not isinstance(state, torch.Tensor) or self.batch is None:
            return state
        return state.expand(self.batch, *state.shape[1:]).contiguous()


class PrefixLinearLayer(LinearAttentionLayer):
    """Read-only state of a linear-attention layer (Qwen3.5's gated DeltaNet) after the prefix: its last ``kernel``
    convolution inputs and its recurrent state. New tokens start from them and nothing is stored back, so one
    prefix serves every batch size and a recomputed (checkpointed) layer reads the same state. With ``record``,
    keeps the states the new tokens end with: that is how the prefix's own states are captured. ``batch``: rows of
    the batch that reads the state (see :class:`_PerRow`)."""

    def __init__(self, conv: torch.Tensor | None = None, recurrent: torch.Tensor | None = None, record: bool = False,
                 batch: int | None = None):
        super().__init__()
        self.record = record
        self.record_past = True  # keeps the layer off the one-token decode kernel, which updates state in place
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self._conv: torch.Tensor | None = None
        if conv is not None and recurrent is not None:
            self.conv_states[0] = conv
            self.recurrent_states = _PerRow(recurrent, batch)
            self.has_previous_state[0] = True

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs: Any) -> torch.Tensor:
        prev = self.conv_states[0] if self.has_previous_state[0] else None
        full = conv_states if prev is None else torch.cat([prev.expand(conv_states.shape[0], -1, -1), conv_states], dim=-1)
        if self.record:  # the last k inputs, left-padded with zeros when there are fewer (as transformers pads)
            k = conv_kernel_size or self.conv_kernel_size.get(0) or 4
            tail = full[..., -k:]
            self._conv = F.pad(tail, (k - tail.shape[-1], 0)) if tail.shape[-1] < k else tail
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        if self.record:
            assert self._conv is not None
            self.recorded = (self._conv, recurrent_states)
        return recurrent_states


class PrefixCache(Cache):
    """One read-only layer per decoder layer, of the kind the family says the layer needs."""

    def __init__(self, layers: list[Any]):
        super().__init__(layers=layers)  # type: ignore[arg-type]

    @staticmethod
    def _layer(kind: str, state: Any, record: bool, batch: int | None = None, rows: PrefixRows | None = None, index: int = 0) -> Any:
        if kind == "linear":
            return PrefixLinearLayer(*(state or (None, None)), record=record, batch=batch)
        # "none": the layer reuses another layer's keys (Gemma 4's shared layers) and never calls the cache.
        return PrefixLayer(*(state or (None, None)), record=record and kind == "kv", rows=rows, index=index)

    @classmethod
    def recorder(cls, kinds: list[str], prefix: PrefixKV | None = None) -> PrefixCache:
        states: list[Any] = prefix.states if prefix is not None else [None] * len(kinds)
        return cls([cls._layer(k, st, True) for k, st in zip(kinds, states)])

    @classmethod
    def reading(cls, prefix: PrefixKV, batch: int) -> PrefixCache:
        """The prefix's states for a forward over ``batch`` rows."""
        return cls([cls._layer(k, st, False, batch, prefix.rows, i) for i, (k, st) in enumerate(zip(prefix.kinds, prefix.states))])

    def recorded(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [getattr(layer, "recorded", None) for layer in self.layers]


@dataclass
class PrefixKV:
    """State of a shared token prefix per decoder layer, batch dimension 1: (keys, values) for attention layers,
    (convolution window, recurrent state) for linear-attention layers, None for layers that keep nothing."""

    states: list[tuple[torch.Tensor, torch.Tensor] | None]
    kinds: list[str]
    length: int
    rows: PrefixRows | None = None
    """Set by prediction's scorer: the prefix laid out per row, kept from batch to batch (:class:`PrefixRows`)."""


def _family(model: Any, family: Family | None) -> Family:
    """The caller's family (looked up once, at load), or the model's for a one-off call."""
    return family if family is not None else families.for_model(model)


def compute_prefix(model: Any, prefix_ids: Sequence[int], device: torch.device | str | None = None, family: Family | None = None) -> PrefixKV:
    """Run the shared prefix once (batch 1). Differentiable when grad is enabled (training)."""
    family = _family(model, family)
    core, _ = family.core_and_head(model)
    device = device or next(core.parameters()).device
    ids = to_device(torch.tensor([list(prefix_ids)], dtype=torch.long), device)
    mm = torch.zeros_like(ids, dtype=torch.int32)
    kinds = family.layer_kinds(core)
    cache = PrefixCache.recorder(kinds)
    positions = family.positions(core, ids, mm, {}, 0)
    mask = family.attention_mask(core, None, positions, mm, 0)
    core(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False, **{cache_kwarg(core): cache})
    return PrefixKV(cache.recorded(), kinds, len(prefix_ids))


def _forward(family: Family, core: Any, input_ids: torch.Tensor, mm: torch.Tensor, vision: dict[str, torch.Tensor],
             positions: torch.Tensor | None, prefix: PrefixKV | None, allowed: torch.Tensor | None, rows: PackedRows | None = None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """The family's core forward over ``input_ids`` after ``prefix``: last hidden states (B, S, H), or with ``keep`` (B, K)
    those at the kept positions only, (B, K, H). ``allowed`` (B or 1, S, P + S): who sees whom, None for causal.
    ``rows``: the layout ``allowed`` describes, for attention kernels that can use it (:class:`mcvqa.kernels.PackedRows`).
    Where the last decoder layer can run at the kept positions alone (:func:`mcvqa.kernels.answer_only_last_layer`),
    it does."""
    p = prefix.length if prefix is not None else 0
    mask = family.attention_mask(core, allowed, positions, mm, p) if positions is not None else None
    if rows is not None:
        rows.attach(mask)
    extra: dict[str, Any] = {}
    layers = family.decoder_layers(core) if keep is not None else []
    if layers and getattr(layers[-1], "answers_only", False):
        keys = torch.arange(p + input_ids.shape[1], device=input_ids.device)
        if allowed is None:  # causal: a kept position sees the prefix and its row up to itself
            sees = keys[None, None, :] <= (p + keep)[..., None]
        else:
            sees = allowed.expand(keep.shape[0], -1, -1).gather(1, keep[..., None].expand(-1, -1, allowed.shape[-1]))
        extra[ANSWER_ONLY] = AnswerOnly(keep, sees)
    out = core(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        **{cache_kwarg(core): PrefixCache.reading(prefix, input_ids.shape[0]) if prefix is not None else None},
        **family.vision_kwargs(vision, mm),
        **extra,
    )
    hidden = out.last_hidden_state
    if keep is None or (extra and extra[ANSWER_ONLY].applied):
        return hidden
    return hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))


def answer_hidden(model: Any, batch: Batch, prefix: PrefixKV | None = None, family: Family | None = None) -> torch.Tensor:
    """Final hidden state (after the last norm) at each row's answer position: (B, hidden).

    ``batch`` holds the suffix only when ``prefix`` is given, or the whole sequence (``batch.prefix_len`` > 0).
    No attention mask beyond causality: with right padding, causal attention already keeps every real token
    from seeing a pad, and leaving the mask out lets SDPA take its fused causal kernels (families that need
    their own masks, Gemma 4's, build them from the positions).
    """
    family = _family(model, family)
    core, _ = family.core_and_head(model)
    if prefix is not None and batch.prefix_len:
        raise ValueError("batch already contains the prefix")
    offset = prefix.length if prefix is not None else 0
    positions = _positions(family, core, batch, offset)
    keep = (batch.lengths.to(batch.input_ids.device) - 1)[:, None]
    return _forward(family, core, batch.input_ids, batch.mm_token_type_ids, _vision(core, batch), positions, prefix, None, keep=keep)[:, 0]


def _positions(family: Family, core: Any, batch: Batch, offset: int) -> torch.Tensor | None:
    """The family's positions for ``batch``, computed from its host copy and sent to its device.

    M-RoPE's index walks each row in Python (``tolist``, ``item``); on CUDA tensors every such read waits for the
    GPU to finish the batch before it, on the host copy none does, so the next batch's kernels queue while this
    one runs.
    """
    src = batch.on_host
    pos = family.positions(core, src.input_ids, src.mm_token_type_ids, src.vision, offset)
    return None if pos is None else to_device(pos, batch.input_ids.device)


def _vision(core: Any, batch: Batch) -> dict[str, torch.Tensor]:
    """The batch's image tensors for ``core``; the image grid from the host copy when the vision tower reads it
    there (:func:`mcvqa.kernels.host_grid_vision`), so its per-image bookkeeping never waits for the GPU."""
    return host_grid(core, batch.vision, batch.on_host.vision)


def host_grid(core: Any, vision: dict[str, torch.Tensor], host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not getattr(getattr(core, "visual", None), "reads_host_grid", False) or "image_grid_thw" not in host:
        return vision
    return {**vision, "image_grid_thw": host["image_grid_thw"]}


def packed_answer_hidden(model: Any, batch: Batch, prefix_ids: Sequence[int], family: Family | None = None, by_rows: bool = False) -> torch.Tensor:
    """Like :func:`answer_hidden` with a shared prefix, but prefix and every row go through ONE forward pass.

    The batch is packed into a single sequence ``[prefix, row 1, row 2, ...]`` (padding dropped) with a
    mask that lets each row see the prefix and its own earlier tokens only. Each layer then runs one matrix
    product over ``P + sum(len)`` tokens instead of one for the prefix and one for the rows - which matters
    for 4-bit weights, dequantised once per matrix product. Exact: same keys, queries and positions.
    Families whose layers ignore masks (``Family.packed`` False) run the cached-prefix forward instead. ``by_rows``:
    the mask carries its layout, so mcvqa's attention attends row by row (:class:`mcvqa.kernels.PackedRows`).
    """
    family = _family(model, family)
    if not family.packed:
        return answer_hidden(model, batch, compute_prefix(model, prefix_ids, batch.input_ids.device, family), family)
    core, _ = family.core_and_head(model)
    device = batch.input_ids.device
    p = len(prefix_ids)
    b = batch.input_ids.shape[0]
    lengths = batch.on_host.lengths.tolist()
    pos = _positions(family, core, batch, p)
    assert pos is not None
    prefix_t = to_device(torch.tensor(list(prefix_ids), dtype=torch.long), device)
    ids = torch.cat([prefix_t] + [batch.input_ids[i, : lengths[i]] for i in range(b)])[None]
    mm = torch.cat([torch.zeros(p, dtype=batch.mm_token_type_ids.dtype, device=device)] + [batch.mm_token_type_ids[i, : lengths[i]] for i in range(b)])[None]
    if pos.dim() == 3:  # M-RoPE (4, B, S)
        prefix_pos = torch.arange(p, device=device).view(1, p).expand(pos.shape[0], p)
        positions = torch.cat([prefix_pos] + [pos[:, i, : lengths[i]] for i in range(b)], dim=1)[:, None, :]
    else:
        positions = torch.cat([torch.arange(p, device=device)] + [pos[i, : lengths[i]] for i in range(b)])[None]
    segment = torch.cat([torch.zeros(p, dtype=torch.long, device=device)] + [torch.full((n,), i + 1, dtype=torch.long, device=device) for i, n in enumerate(lengths)])
    t = segment.shape[0]
    idx = torch.arange(t, device=device)
    allowed = (idx[None, :] <= idx[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    ends = p + torch.cumsum(batch.lengths.to(device), 0) - 1
    return _forward(family, core, ids, mm, _vision(core, batch), positions, None, allowed[None], PackedRows(p, lengths) if by_rows else None, keep=ends[None])[0]


def head_rows(head: torch.nn.Module, hidden: torch.Tensor, token_ids: Sequence[int], family: Family | None = None) -> torch.Tensor:
    """Logits of selected vocabulary rows only (4-16 dot products instead of the whole vocabulary), with the
    family's final transform (Gemma's soft cap)."""
    return (family or Family()).head_logits(head, hidden, token_ids)


# ------------------------------------------------------------------------------------------ scorer


class Scorer:
    """Letter probabilities for batches of questions, with the system-prompt cache managed for you.

    Call :meth:`invalidate` after changing weights (test-time adaptation) so the prefix is recomputed.
    """

    def __init__(self, model: Any, encoder: Encoder, *, prefix_cache: bool = True, keep_rows: bool = False) -> None:
        self.model = model
        self.encoder = encoder
        self.keep_rows = keep_rows
        """Keep the prefix laid out per row between batches (:class:`PrefixRows`): prediction's scorer does; training's
        validation does not (its memory is the training run's)."""
        self.letters = letter_tokens(encoder.tokenizer)
        self.family = families.for_model(model)
        # Families without a cacheable prefix (the plain path for unlisted checkpoints) run whole sequences.
        self.use_prefix_cache = prefix_cache and self.family.prefix_cache
        self._prefix: PrefixKV | None = None
        self._backward_ready = False
        core, self.head = self.family.core_and_head(model)
        self.device = next(core.parameters()).device

    def invalidate(self) -> None:
        self._prefix = None

    def prefix(self) -> PrefixKV:
        if self._prefix is None:
            with torch.no_grad():
                self._prefix = compute_prefix(self.model, self.encoder.prefix_ids, self.device, self.family)
            if self.keep_rows:
                self._prefix.rows = PrefixRows(self._prefix.kinds)
        return self._prefix

    def logprobs(self, batch: Batch, grad: bool = False, prefix_grad: bool = True) -> torch.Tensor:
        """(B, 4) float32 log-probabilities over a-d. ``batch`` must hold suffixes (see :class:`~mcvqa.features.Collator`).

        With ``grad``, the prefix is recomputed with gradients too unless ``prefix_grad`` is False (when
        what is being tuned does not touch it, e.g. a soft prompt after the image).
        """
        batch = batch.to(self.device)
        if grad:
            self._ready_for_backward()
        with torch.set_grad_enabled(grad), self._rows_given_back_on_oom():
            if self.use_prefix_cache and not batch.prefix_len:
                prefix = self.prefix() if not (grad and prefix_grad) else compute_prefix(self.model, self.encoder.prefix_ids, self.device, self.family)
                hidden = answer_hidden(self.model, batch, prefix, self.family)
            else:
                hidden = answer_hidden(self.model, batch, None, self.family)
            return letter_logprobs(head_rows(self.head, hidden, self.letters.all_ids, self.family), self.letters)

    @contextlib.contextmanager
    def _rows_given_back_on_oom(self) -> Iterator[None]:
        """A forward that runs out of memory gives the kept prefix rows back before the engine halves the batch and
        tries again (:class:`PrefixRows`): the retries then have that memory."""
        try:
            yield
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            rows = self._prefix.rows if self._prefix is not None else None
            if rows is not None and (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)):
                rows.release()
            raise

    def logprobs_orders(self, examples: Sequence[OrderedExample], grad: bool = False) -> torch.Tensor:
        """(B, V, 4) log-probabilities of each question under each option order, indexed by ORIGINAL option.

        The image and question are run once per question and shared by its V orderings (two-level prefix:
        system prompt -> image + question -> options). Exact: equal to scoring each permuted question alone.
        """
        if not (self.family.packed and self.use_prefix_cache):
            # One row per order (the question repeated): exact for every family, without the sharing.
            v = len(examples[0].option_variants)
            flat = [ex.variant(k) for ex in examples for k in range(v)]
            lp = self.logprobs(self.encoder.collate(flat, with_prefix=self.with_prefix_in_batch), grad=grad).view(len(examples), v, 4)
        else:
            if grad:
                self._ready_for_backward()
            with torch.set_grad_enabled(grad), self._rows_given_back_on_oom():
                prefix = self.prefix() if not grad else compute_prefix(self.model, self.encoder.prefix_ids, self.device, self.family)
                lp = shared_prefix_logprobs(self.model, self.encoder, examples, prefix, self.letters, self.head, self.device, self.family)
        # The option shown at letter j is original option order[j]: one scatter with an index built on the host (a
        # Python list as a CUDA index is copied from pageable memory per row, each copy waiting for the GPU).
        index = to_device(torch.tensor([list(ex.orders) for ex in examples], dtype=torch.long), lp.device)
        return torch.empty_like(lp).scatter(2, index, lp)

    def _ready_for_backward(self) -> None:
        """Test-time adaptation's first gradient: the family's kernels fit for a backward (:func:`families.prepare_backward`)."""
        if not self._backward_ready:
            families.prepare_backward(self.model, log.warning)
            self._backward_ready = True

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
    family: Family | None = None,
) -> torch.Tensor:
    """(B, V, 4) letter log-probs by displayed letter, for V option segments per question (see logprobs_orders).

    One forward pass, one row per question: ``[image + question, options under order 1, ..., order V]`` after the
    cached system prompt. A mask lets each options segment see the system prompt, its question and itself only
    (never the other orders), and every segment's positions continue from the end of the question as if it came
    right after it: each segment is scored exactly as its permuted question alone would be. The image and the
    question go through the model once, their keys and values are never copied per order, and there is no
    padding inside a row (the cost of 4 orders against one: BENCHMARKS.md, "End to end").
    Kept as one function on purpose (83 lines): rows, positions and mask describe one packed forward and are only
    checkable together (``test_shared_question_prefix_for_option_orders_is_exact``).
    """
    family = _family(model, family)
    core, _ = family.core_and_head(model)
    B, V = len(examples), len(examples[0].option_variants)
    if any(len(ex.option_variants) != V for ex in examples):
        raise ValueError("every question needs the same number of option orders")
    P = prefix.length
    vision_host, _ = cat_vision([ex.vision for ex in examples], family.vision_pad)
    vision = host_grid(core, {k: to_device(v, device) for k, v in vision_host.items()}, vision_host)
    # Positions of image + question (real lengths) as the single-order path computes them.
    stage1 = [ex.image_ids + ex.question_ids for ex in examples]
    len1 = [len(r) for r in stage1]
    l1 = max(len1)
    ids1 = torch.full((B, l1), encoder.pad_id, dtype=torch.long)
    mm1 = torch.zeros((B, l1), dtype=torch.int32)
    for i, (r, ex) in enumerate(zip(stage1, examples)):
        ids1[i, : len(r)] = torch.tensor(r)
        mm1[i, : len(ex.image_types)] = torch.tensor(ex.image_types, dtype=torch.int32)
    pos1 = to_device(family.positions(core, ids1, mm1, vision_host, P), device)  # (4, B, l1) M-RoPE or (B, l1), on the host (see _positions)
    pos1 = pos1 if pos1.dim() == 3 else pos1[None]
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
    mm = torch.zeros((B, L), dtype=torch.int32)
    for i in range(B):
        n = len(rows_ids[i])
        ids[i, :n], seg[i, :n], step[i, :n] = torch.tensor(rows_ids[i]), torch.tensor(segs[i]), torch.tensor(steps[i])
        mm[i, : len(examples[i].image_types)] = torch.tensor(examples[i].image_types, dtype=torch.int32)
    ids, seg, step, mm = (to_device(t, device) for t in (ids, seg, step, mm))
    n1_t = to_device(torch.tensor(len1), device)
    rows = torch.arange(B, device=device)
    # Segments continue where the question ends: text position P + len1 + i; M-RoPE axes (max so far) + 1 + i.
    text_next = (P + n1_t)[:, None] + step
    if pos1.shape[0] > 1:
        next_pos = pos1[1:, rows, n1_t - 1].max(dim=0).values + 1  # (B,)
        positions = torch.stack([text_next] + [next_pos[:, None] + step] * (pos1.shape[0] - 1))  # (4, B, L)
    else:
        positions = text_next[None]
    positions[:, :, :l1] = torch.where((seg[:, :l1] == 0)[None], pos1, positions[:, :, :l1])
    if positions.shape[0] == 1:
        positions = positions[0]
    # Who sees whom among the row's tokens: causal, and a segment sees the question and itself only.
    t = torch.arange(L, device=device)
    causal = t[None, :] <= t[:, None]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed = causal[None] & same
    allowed |= torch.eye(L, dtype=torch.bool, device=device)[None]  # padding rows see themselves (no empty softmax)
    allowed = torch.cat([torch.ones((B, L, P), dtype=torch.bool, device=device), allowed], dim=-1)
    # The answer of order v is read at the last token of its segment.
    lengths = to_device(torch.tensor([[len(o) for o in ex.option_variants] for ex in examples]), device)  # (B, V)
    ends = n1_t[:, None] + torch.cumsum(lengths, dim=1) - 1
    hidden = _forward(family, core, ids, mm, vision, positions, prefix, allowed, keep=ends).reshape(B * V, -1)
    lp = letter_logprobs(head_rows(head, hidden, letters.all_ids, family), letters)
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
    family = _family(model, None)  # one question per call: the lookup is nothing beside a generate
    core, _ = family.core_and_head(model)
    device = next(core.parameters()).device
    batch = batch.to(device)
    letters = letter_tokens(encoder.tokenizer)
    with torch.no_grad():
        out = model.generate(
            input_ids=batch.input_ids,
            attention_mask=torch.ones_like(batch.input_ids),
            **family.vision_kwargs(batch.vision, batch.mm_token_type_ids),
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
