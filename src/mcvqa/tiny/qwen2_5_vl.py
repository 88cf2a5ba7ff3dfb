"""Tiny Qwen2.5-VL: patch 14, windowed vision attention with full-attention blocks, 2-D merge of 2 x 2 patches."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from mcvqa.tiny.toolkit import TinySpec, CHAT_TEMPLATE, SPECIAL_TOKENS, local_tokenizer, save_tiny


def build(out: str | Path, spec: TinySpec) -> Path:
    tok = local_tokenizer(spec.vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    ip = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                               size={"shortest_edge": 28 * 28, "longest_edge": 16384 * 28 * 28})
    processor = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
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
    return save_tiny(model, processor, Path(out), spec, 56)
