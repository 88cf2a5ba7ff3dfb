"""Tiny LLaVA-OneVision: the real ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2) with AnyRes tiles."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_llava_onevision import LlavaOnevisionImageProcessor
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

from mcvqa.tiny.toolkit import TinySpec, chatml_template, local_tokenizer, save_tiny


def build(out: str | Path, spec: TinySpec) -> Path:
    side, patch = 32, 16  # AnyRes over 32 px tiles of 2 x 2 patches, plus the whole image
    pinpoints = [[side * i, side * j] for i in (1, 2) for j in (1, 2)]
    named = {"image_token": "<image>", "video_token": "<video>"}
    tok = local_tokenizer(spec.vocab_size, list(named.values()), chatml_template("<image>\n"), named)
    ip = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, crop_size={"height": side, "width": side},
                                      image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(),
                                        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
                                        chat_template=tok.chat_template)
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=spec.vision_hidden_size, num_hidden_layers=spec.vision_depth,
                           num_attention_heads=spec.vision_heads, intermediate_size=spec.vision_intermediate_size, image_size=side, patch_size=patch),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                         num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=8192,
                         pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         tie_word_embeddings=False),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    return save_tiny(model, processor, Path(out), spec, 48)
