"""What differs between model families, behind one interface.

A :class:`Family` knows, for one kind of checkpoint, everything the rest of mcvqa must not branch on: the text its
chat template renders for one image, how an image becomes token ids and tensors, the position ids of a suffix that
follows a cached prefix, which attention masks the language model takes, what a cached prefix holds per layer
(keys and values; a recurrent and a convolution state for linear-attention layers; nothing for layers that reuse
another layer's keys), the head's logit transform, which modules LoRA adapts and which stay unquantised under nf4,
and how its config shrinks to a tiny test model. Scoring, training, adaptation and serving call these methods and
never test the family's name.

The base class is the plain path any ``AutoModelForImageTextToText`` checkpoint can take: no cached prefix, full
sequences, the processor's own tensors passed through. First-class families (:mod:`mcvqa.families`) override what
their fast path needs; each is tested for exactness against the plain full-sequence forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mcvqa.errors import ModelError
from mcvqa.runtime import to_device


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (LoRA layers are injected in place, so they still run). Model
    access lives with the families, below the loader, so nothing here imports upwards."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class Family:
    """One model family. Subclasses override class attributes and the methods their fast path changes."""

    name = "generic"
    model_types: tuple[str, ...] = ()
    """``config.model_type`` values this family serves."""
    processor_classes: tuple[str, ...] = ()
    """Processor class names that identify it when only the processor is at hand (the Encoder)."""
    first_class = False
    """Fast path, tests and measured figures; otherwise the plain, uncached path (said so at load time)."""
    image_placeholder: str | None = None
    """What the chat template renders for one image; None: found by rendering the template with and without one."""
    template_kwargs: dict[str, Any] = {}
    """Extra chat-template variables (e.g. thinking switched off)."""
    prefix_cache = False
    """Whether the shared system prompt can be run once and its state reused for every batch."""
    packed = False
    """Whether independent token segments can share one row, kept apart by a 4D attention mask (option orders in
    one pass, packed training). False where a layer ignores masks (linear attention: the recurrence sees every
    earlier token of the row)."""
    extra_lora_targets: tuple[str, ...] = ()
    """Language-model linear layers LoRA adapts beyond the configured ``lora.target_modules``."""
    vision_lora_targets: tuple[str, ...] = ()
    skip_quant: tuple[str, ...] = ("lm_head",)
    """Module names kept in bf16 under 4-bit/8-bit loading (vision tower, projector, head, tiny projections)."""
    mm_kwarg = False
    """Whether the model's forward takes ``mm_token_type_ids``."""
    vision_pad: dict[str, float] = {}
    """Pad value per vision tensor when images of different sizes are batched (default 0)."""
    rms_norm_offset: float | None = None
    """The language model's RMSNorm form, for the fused kernels (``model.kernels``): 0.0 for ``weight * norm(x)`` cast
    before scaling (Llama, Qwen), 1.0 for ``(1 + weight) * norm(x)`` in fp32; None leaves its norms alone."""
    fused_rope = False
    """Whether the attention's ``apply_rotary_pos_emb`` is the plain (q, k, cos, sin) one Liger's RoPE kernel replaces."""

    def __init__(self, config: Any | None = None) -> None:
        self.config = config
        """The checkpoint's config when known (model side); None on the processor side."""

    # -- loading ------------------------------------------------------------------------------------------

    def describe(self) -> str:
        fast = [w for w, on in (("cached prefix", self.prefix_cache), ("one-pass option orders / packed training", self.packed)) if on]
        return f"{self.name}: " + (", ".join(fast) if fast else "plain uncached path (every question runs its full prompt)")

    def prepare_backward(self, model: Any) -> str | None:
        """Make the model's kernels fit for a backward pass (training, test-time adaptation); returns a line for the
        user when something was switched. Nothing to do for most families."""
        return None

    def core_and_head(self, model: Any) -> tuple[Any, torch.nn.Module]:
        base = unwrap(model)
        core = getattr(base, "model", None)
        head = getattr(base, "lm_head", None)
        if core is None or head is None:
            raise ModelError(f"{type(base).__name__} has no .model/.lm_head: not a conditional-generation model mcvqa can score")
        return core, head

    def text_model(self, core: Any) -> Any:
        return getattr(core, "language_model", core)

    def decoder_layers(self, core: Any) -> list[torch.nn.Module]:
        return list(self.text_model(core).layers)

    def layer_kinds(self, core: Any) -> list[str]:
        """Per decoder layer, what a cached prefix holds: ``kv``, ``linear`` (conv + recurrent state) or ``none``."""
        return ["kv"] * len(self.decoder_layers(core))

    # -- tokens and images --------------------------------------------------------------------------------

    def image_token_id(self, tokenizer: Any, config: Any | None = None) -> int:
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None) if config is not None else None
            if isinstance(value, int):
                return value
        token = getattr(tokenizer, "image_token", None)
        if token:
            return int(tokenizer.convert_tokens_to_ids(token))
        raise ModelError("cannot tell which token stands for image content")

    def encode_image(self, processor: Any, image: Any) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """(token ids, mm token types, tensors) of one prepared image as the processor expands its placeholder."""
        placeholder = self.image_placeholder
        if placeholder is None:
            raise ModelError(f"{self.name}: no image placeholder known")
        out = processor(text=[placeholder], images=[image], return_tensors="pt", add_special_tokens=False, return_mm_token_type_ids=True)
        ids = out["input_ids"][0].tolist()
        mm = out.get("mm_token_type_ids")
        types = mm[0].tolist() if mm is not None else [0] * len(ids)
        tensors = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") and isinstance(v, torch.Tensor)}
        return ids, types, tensors

    def pixel_dtype(self, core: Any) -> torch.dtype | None:
        """The dtype the image tensors may be cast to in the loader's workers without changing any result: the
        vision tower's when its first operation casts them to it anyway (half the bytes to pin and copy to the
        GPU), else None (kept as the processor makes them)."""
        return None

    def pixel_dtype_for(self, dtype: torch.dtype, wrapped: Callable[[str], bool] | None = None) -> torch.dtype | None:
        """What :meth:`pixel_dtype` will say of a model loaded in ``dtype``, said before its weights exist: ``predict``
        starts its loader's workers while the weights load, and uses the encoder made with this only where
        :meth:`pixel_dtype` of the loaded model agrees. ``wrapped(name)``, when given, tells whether the adapter to be
        loaded wraps the module of that name (the model's own module names, as peft matches them)."""
        return None

    def native_image_tokens(self, width: int, height: int, factor: int) -> int | None:
        """Tokens of an image at native resolution ``width`` x ``height`` (already fitted to the pixel budget), without
        running the processor; None when the family cannot tell that cheaply (used to sort batches by length)."""
        return None

    # -- the forward --------------------------------------------------------------------------------------

    def positions(self, core: Any, input_ids: torch.Tensor, mm: torch.Tensor, vision: dict[str, torch.Tensor], offset: int) -> torch.Tensor | None:
        """Position ids of ``input_ids`` placed after ``offset`` cached tokens: (B, S) for plain 1-D RoPE."""
        b, s = input_ids.shape
        return (torch.arange(s, device=input_ids.device) + offset).view(1, s).expand(b, s)

    @staticmethod
    def text_positions(positions: torch.Tensor) -> torch.Tensor:
        """(B, S) sequence positions from what :meth:`positions` returns (row 0 of M-RoPE's (4, B, S))."""
        return positions[0] if positions.dim() == 3 else positions

    def vision_kwargs(self, vision: dict[str, torch.Tensor], mm: torch.Tensor) -> dict[str, Any]:
        kw: dict[str, Any] = dict(vision)
        if self.mm_kwarg:
            kw["mm_token_type_ids"] = mm
        return kw

    def attention_mask(self, core: Any, allowed: torch.Tensor | None, positions: torch.Tensor, mm: torch.Tensor, prefix_len: int) -> Any:
        """The ``attention_mask`` argument for a forward over (B, S) new tokens after ``prefix_len`` cached ones.

        ``allowed`` (B, S, prefix_len + S) boolean says which tokens a token may see (None: plain causal, where the
        model's own default is exact and fastest)."""
        return None if allowed is None else allowed[:, None]

    def head_logits(self, head: torch.nn.Module, hidden: torch.Tensor, token_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Logits of the vocabulary rows ``token_ids`` (all rows when None), with the family's final transform."""
        if token_ids is None:
            return head(hidden)
        weight = getattr(head, "weight", None)
        if isinstance(head, torch.nn.Linear) and weight is not None and weight.dtype.is_floating_point and weight.dim() == 2:
            idx = to_device(torch.tensor(list(token_ids)), weight.device)  # pinned: no wait for the GPU
            bias = head.bias[idx] if head.bias is not None else None
            return F.linear(hidden.to(weight.dtype), weight[idx], bias)
        return head(hidden)[:, list(token_ids)]

    # -- toy sizes (mcvqa.tiny builds with them) ------------------------------------------------------------

    def shrink_text(self, text: Any, spec: Any) -> None:
        text.hidden_size = spec.hidden_size
        text.intermediate_size = spec.intermediate_size
        text.num_hidden_layers = spec.num_hidden_layers
        text.num_attention_heads = spec.num_attention_heads
        text.num_key_value_heads = spec.num_key_value_heads
        if getattr(text, "layer_types", None):
            text.layer_types = list(text.layer_types)[: spec.num_hidden_layers]

    def shrink_vision(self, vision: Any, spec: Any, text_hidden: int) -> None:
        depth_name = next((n for n in ("depth", "num_hidden_layers") if hasattr(vision, n)), None)
        depth = int(getattr(vision, depth_name, spec.vision_depth)) if depth_name else spec.vision_depth
        if depth_name:
            setattr(vision, depth_name, spec.vision_depth)
        for name, value in (("hidden_size", spec.vision_hidden_size), ("intermediate_size", spec.vision_intermediate_size),
                            ("num_heads", spec.vision_heads), ("num_attention_heads", spec.vision_heads)):
            if hasattr(vision, name):
                setattr(vision, name, value)
        if hasattr(vision, "num_key_value_heads"):
            vision.num_key_value_heads = spec.vision_heads
        if hasattr(vision, "out_hidden_size"):
            vision.out_hidden_size = text_hidden
        for name in ("deepstack_visual_indexes", "fullatt_block_indexes"):
            taps = getattr(vision, name, None)
            if taps:
                setattr(vision, name, sorted({min(spec.vision_depth - 1, int(i) * spec.vision_depth // depth) for i in taps}))

    def shrink(self, config: Any, spec: Any) -> Any:
        """The real config at toy sizes; vocabulary, token ids, head_dim, RoPE and patch sizes stay as they are."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.shrink_text(text, spec)
        vision = getattr(config, "vision_config", None)
        if vision is not None:
            self.shrink_vision(vision, spec, spec.hidden_size)
        return config


