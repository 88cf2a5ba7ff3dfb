"""Tiny Qwen3.5: the real ``Qwen3_5ForConditionalGeneration``, hybrid linear/full attention, partial M-RoPE, a
thinking chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from mcvqa.tiny.toolkit import TinySpec, SPECIAL_TOKENS, chatml_template, local_tokenizer, save_tiny


def build(out: str | Path, spec: TinySpec) -> Path:
    template = chatml_template("<|vision_start|><|image_pad|><|vision_end|>", thinking=True)
    tok = local_tokenizer(spec.vocab_size, ["<think>", "</think>"], template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    ip = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                               size={"shortest_edge": spec.min_pixels, "longest_edge": 16384 * 32 * 32})
    processor = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2), chat_template=template)
    n = max(2, spec.num_hidden_layers)
    rope = spec.head_dim // 4  # partial rotary 0.25, M-RoPE sections over it
    config = Qwen3_5Config(
        text_config=dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=n, layer_types=["linear_attention"] * (n - 1) + ["full_attention"], full_attention_interval=n,
                         num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
                         linear_num_key_heads=spec.num_attention_heads, linear_num_value_heads=2 * spec.num_attention_heads,
                         linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                          "mrope_section": [rope // 2 - 2 * (rope // 6), rope // 6, rope // 6], "mrope_interleaved": True},
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False),
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
                           num_heads=spec.vision_heads, out_hidden_size=spec.hidden_size, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=spec.num_position_embeddings, deepstack_visual_indexes=[]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3_5ForConditionalGeneration(config)
    return save_tiny(model, processor, Path(out), spec, spec.image_size)
