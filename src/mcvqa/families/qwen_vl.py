"""Qwen3-VL and Qwen2.5-VL: M-RoPE positions, a DeepStack (Qwen3-VL) vision tower, plain causal attention."""

from __future__ import annotations

from typing import Any

import torch

from mcvqa.families.base import Family

QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class QwenVL(Family):
    name = "qwen_vl"
    model_types = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl")
    processor_classes = ("Qwen3VLProcessor", "Qwen2_5_VLProcessor", "Qwen2VLProcessor")
    first_class = True
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

    def build_tiny(self, out: Any, spec: Any, arch: str) -> Any:
        from pathlib import Path

        from mcvqa import tiny

        if arch == "qwen3_vl":
            return tiny.build_tiny(out, spec)
        # Qwen2.5-VL: patch 14, windowed vision attention with full-attention blocks, 2-D merge of 2 x 2 patches.
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        tok = tiny.local_tokenizer(spec.vocab_size)
        ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
        ip = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                   size={"shortest_edge": 28 * 28, "longest_edge": 16384 * 28 * 28})
        processor = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=tiny.CHAT_TEMPLATE)
        half = spec.head_dim // 2
        config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                             num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                             num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=8192,
                             rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]},
                             pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False),
            vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
                               num_heads=spec.vision_heads, out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=56, fullatt_block_indexes=[spec.vision_depth - 1]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
        )
        torch.manual_seed(spec.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        return tiny.save_tiny(model, processor, Path(out), spec, 56)
