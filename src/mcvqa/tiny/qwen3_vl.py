"""Tiny Qwen3-VL: the real ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLProcessor`` (patch 16, merge 2,
DeepStack, interleaved M-RoPE) at toy sizes, Qwen3-VL Instruct's chat template."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from mcvqa.io import share_files
from mcvqa.tiny.toolkit import TinySpec, build_processor


def build(out: str | Path, spec: TinySpec | None = None) -> Path:
    """Create the tokenizer, processor and randomly initialised model and save them to ``out``."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    spec = spec or TinySpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor, ids = build_processor(spec.vocab_size, spec.min_pixels)
    tokenizer = processor.tokenizer

    rope_dims = spec.head_dim // 2
    section = [rope_dims - 2 * (rope_dims * 3 // 8), rope_dims * 3 // 8, rope_dims * 3 // 8]  # t, h, w like [24, 20, 20]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            head_dim=spec.head_dim,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": section, "mrope_interleaved": True},
            tie_word_embeddings=False,
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=spec.num_position_embeddings,
            deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "mcvqa_tiny.json").write_text(json.dumps(asdict(spec), indent=2) + "\n", encoding="utf-8")
    # How this model should see images unless told otherwise (picked up by predict/train, see config.inherited_settings).
    (out / "mcvqa.yaml").write_text(f"image:\n  mode: letterbox\n  size: {spec.image_size}\n", encoding="utf-8")
    share_files(out)
    return out
