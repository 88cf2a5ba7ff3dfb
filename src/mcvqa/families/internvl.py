"""InternVL (transformers' ``internvl`` format): an InternViT tower, pixel-shuffle projector, a Qwen3 decoder, 1-D RoPE."""

from __future__ import annotations

from mcvqa.families.base import Family


class InternVL(Family):
    name = "internvl"
    model_types = ("internvl",)
    processor_classes = ("InternVLProcessor",)
    first_class = True
    rms_norm_offset = 0.0
    fused_rope = True
    image_placeholder = "<IMG_CONTEXT>"
    prefix_cache = True
    packed = True
    skip_quant = ("model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector", "lm_head")
