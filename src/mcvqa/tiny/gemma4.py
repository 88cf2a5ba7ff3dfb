"""Tiny Gemma 4: the real ``Gemma4ForConditionalGeneration`` and ``Gemma4Processor`` at toy sizes, with sliding and
global layers, per-layer token inputs and shared key/value layers (E4B's features)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessor, Gemma4Processor
from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

from mcvqa.tiny.toolkit import TinySpec, local_tokenizer, save_tiny


def build(out: str | Path, spec: TinySpec) -> Path:
    named = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
             "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    marks = ["<bos>", "<eos>", "<pad>", "<|turn>", "<turn|>", *named.values()]
    tok = local_tokenizer(spec.vocab_size, marks, GEMMA4_TEMPLATE, named)
    tok.bos_token, tok.eos_token, tok.pad_token = "<bos>", "<turn|>", "<pad>"
    ip = Gemma4ImageProcessor(patch_size=16, max_soft_tokens=70, pooling_kernel_size=3)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=ip, tokenizer=tok,
                                video_processor=Gemma4VideoProcessor(), chat_template=GEMMA4_TEMPLATE, image_seq_length=70)
    ids = {t: tok.convert_tokens_to_ids(t) for t in marks}
    config = Gemma4Config(
        text_config=dict(vocab_size=len(tok), vocab_size_per_layer_input=len(tok), hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                         num_global_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim, global_head_dim=2 * spec.head_dim,
                         sliding_window=48, use_bidirectional_attention="vision", final_logit_softcapping=30.0,
                         # E4B's features too: per-layer token inputs, and the last layers reusing earlier layers' keys and values
                         hidden_size_per_layer_input=8, num_kv_shared_layers=2, max_position_embeddings=8192,
                         pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<turn|>"]),
        vision_config=dict(hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
                           num_hidden_layers=spec.vision_depth, num_attention_heads=spec.vision_heads, num_key_value_heads=spec.vision_heads,
                           head_dim=spec.vision_hidden_size // spec.vision_heads, global_head_dim=spec.vision_hidden_size // spec.vision_heads,
                           patch_size=16, pooling_kernel_size=3, default_output_length=70),
        audio_config=None,
        image_token_id=ids["<|image|>"], boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
        audio_token_id=ids["<|audio|>"], boa_token_id=ids["<|audio>"], eoa_token_id=ids["<audio|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = Gemma4ForConditionalGeneration(config)
    return save_tiny(model, processor, Path(out), spec, 128)


# Gemma 4's turn structure (system, user with image and text, the model's turn as the generation prompt).
GEMMA4_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] | trim }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<turn|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|turn>model\\n' }}{%- endif %}"
)
