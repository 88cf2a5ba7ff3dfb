"""Tiny InternVL3.5: the real ``InternVLForConditionalGeneration`` (Qwen3 language model) with one 64 px tile."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

from mcvqa.tiny.toolkit import TinySpec, chatml_template, local_tokenizer, save_tiny


def build(out: str | Path, spec: TinySpec) -> Path:
    side, patch = 64, 16  # one 64 px tile, 16 px patches, pixel shuffle 0.5: 4 tokens an image
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tok = local_tokenizer(spec.vocab_size, list(named.values()), chatml_template("<IMG_CONTEXT>\n"), named)
    seq = (side // patch) ** 2 // 4
    ip = GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=InternVLVideoProcessor(size={"height": side, "width": side}),
                                  image_seq_length=seq, chat_template=tok.chat_template)
    config = InternVLConfig(
        vision_config=dict(hidden_size=spec.vision_hidden_size, num_hidden_layers=spec.vision_depth, num_attention_heads=spec.vision_heads,
                           intermediate_size=spec.vision_intermediate_size, image_size=[side, side], patch_size=[patch, patch]),
        text_config=dict(model_type="qwen3", vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                         num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim, max_position_embeddings=8192,
                         pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         tie_word_embeddings=False),
        image_token_id=tok.context_image_token_id, image_seq_length=seq, downsample_ratio=0.5, tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = InternVLForConditionalGeneration(config)
    return save_tiny(model, processor, Path(out), spec, side)
