"""Qwen3-VL and Qwen2.5-VL: M-RoPE positions, a DeepStack (Qwen3-VL) vision tower, plain causal attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mcvqa.families.base import Family

QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PATCH_EMBED = "model.visual.patch_embed.proj"
"""The patch embedding's module name in the loaded model (what :meth:`QwenVL.pixel_dtype` reads)."""


class QwenVL(Family):
    name = "qwen_vl"
    model_types = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl")
    processor_classes = ("Qwen3VLProcessor", "Qwen2_5_VLProcessor", "Qwen2VLProcessor")
    first_class = True
    rms_norm_offset = 0.0
    fused_rope = True
    image_placeholder = QWEN_PLACEHOLDER
    prefix_cache = True
    packed = True
    mm_kwarg = True
    vision_lora_targets = ("qkv", "proj", "linear_fc1", "linear_fc2")
    # transformers matches these from the start of a module's full name (or as a suffix): "model.visual", not "visual".
    skip_quant = ("model.visual", "visual", "lm_head")

    def image_token_id(self, tokenizer: Any, config: Any | None = None) -> int:
        return int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))

    def encode_image(self, processor: Any, image: Any) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        # The image processor alone (no tokenizer call): the segment is <|vision_start|> pad x n <|vision_end|>.
        ip = processor.image_processor
        out = ip(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]
        n = int(grid[0].prod().item()) // (int(getattr(ip, "merge_size", 2)) ** 2)
        tok = processor.tokenizer
        ids = [tok.convert_tokens_to_ids("<|vision_start|>")] + [self.image_token_id(tok)] * n + [tok.convert_tokens_to_ids("<|vision_end|>")]
        return ids, [0] + [1] * n + [0], {"pixel_values": out["pixel_values"], "image_grid_thw": grid}

    def pixel_dtype(self, core: Any) -> torch.dtype | None:
        # The patch embedding's first step casts the pixels to its weight's dtype (transformers' Conv3d path and
        # kernels.patch_embed_as_matmul alike). A LoRA wrapper on it (lora.vision) reads them at its own dtype first.
        proj = getattr(getattr(getattr(core, "visual", None), "patch_embed", None), "proj", None)
        if not isinstance(proj, torch.nn.Conv3d) or not proj.weight.is_floating_point():
            return None
        return proj.weight.dtype

    def pixel_dtype_for(self, dtype: torch.dtype, wrapped: Callable[[str], bool] | None = None) -> torch.dtype | None:
        # The vision tower is never quantised (skip_quant), so its patch embedding loads in the load's dtype; an
        # adapter that wraps it (lora.vision) is never merged (merge_adapter takes plain linears only) and keeps
        # pixel_dtype at None.
        if not dtype.is_floating_point or (wrapped is not None and wrapped(PATCH_EMBED)):
            return None
        return dtype

    def native_image_tokens(self, width: int, height: int, factor: int) -> int | None:
        return (width // factor) * (height // factor) + 2  # merged patches between <|vision_start|> and <|vision_end|>

    def positions(self, core: Any, input_ids: torch.Tensor, mm: torch.Tensor, vision: dict[str, torch.Tensor], offset: int) -> torch.Tensor:
        """(4, B, S): row 0 sequence positions (for masks), rows 1-3 M-RoPE (t, h, w).

        Computed on the suffix alone and shifted by the prefix length: the prefix is plain text, whose M-RoPE
        positions are ``0..P-1`` on all three axes, so this equals the index of the whole sequence.
        """
        b, s = input_ids.shape
        grid = vision.get("image_grid_thw")
        if grid is not None and bool(mm.any()):
            vis, _ = core.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=None)
        else:
            vis = torch.arange(s, device=input_ids.device).view(1, 1, s).expand(3, b, s)
        text = torch.arange(s, device=input_ids.device).view(1, 1, s).expand(1, b, s)
        return torch.cat([text, vis], dim=0) + offset
