"""LLaVA-OneVision: a SigLIP tower over AnyRes tiles (plus the whole image), a Qwen2 decoder, 1-D RoPE."""

from __future__ import annotations

from mcvqa.families.base import Family


class LlavaOneVision(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    processor_classes = ("LlavaOnevisionProcessor",)
    first_class = True
    rms_norm_offset = 0.0
    fused_rope = True
    image_placeholder = "<image>"
    prefix_cache = True
    packed = True
    skip_quant = ("model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector", "image_newline", "lm_head")
