"""What every tiny builder uses: a byte-level BPE trained here (Qwen2's pre-tokenizer regex, NFC, Qwen's special
tokens) wrapped in ``Qwen2Tokenizer``, chat templates, the sizes, and saving like any checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mcvqa.io import share_files
from mcvqa.prompts import BUILTIN, load_prompt

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen3-VL Instruct's structure: system (string or text parts), user parts with image/video/text, plain
# assistant turns, and "<|im_start|>assistant\n" as the generation prompt (no <think> block).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chatml_template(image: str, thinking: bool = False) -> str:
    """Qwen-style ChatML with ``image`` rendered for an image item; with ``thinking`` the generation prompt opens
    a ``<think>`` block, closed at once when ``enable_thinking=False`` (Qwen3.5's template does the same)."""
    gen = "{{- '<|im_start|>assistant\\n' }}"
    if thinking:
        gen += ("{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                "{%- else %}{{- '<think>\\n' }}{%- endif %}")
    return (CHAT_TEMPLATE.replace("'<|vision_start|><|image_pad|><|vision_end|>'", repr(image))
            .replace("{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}", "{%- if add_generation_prompt %}" + gen + "{%- endif %}"))


def save_tiny(model: Any, processor: Any, out: Path, spec: Any, image_size: int) -> Path:
    """Save a tiny model like any checkpoint, with its spec and the image size it is meant for."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "mcvqa_tiny.json").write_text(json.dumps(asdict(spec), indent=2) + "\n", encoding="utf-8")
    (out / "mcvqa.yaml").write_text(f"image:\n  mode: letterbox\n  size: {image_size}\n", encoding="utf-8")
    share_files(out)
    return out


@dataclass
class TinySpec:
    """Sizes of the tiny model. The defaults learn the synthetic demo task on 2 CPU cores in minutes."""

    vocab_size: int = 1024
    """Target size of the locally trained BPE vocabulary (special tokens included)."""
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vision_depth: int = 2
    vision_hidden_size: int = 96
    vision_intermediate_size: int = 256
    vision_heads: int = 4
    deepstack_visual_indexes: tuple[int, ...] = (0,)
    num_position_embeddings: int = 256
    """Learned vision position grid (16 x 16 patches = images up to 256 x 256 without interpolation)."""
    image_size: int = 64
    """Letterbox side the tiny model is meant for (64 px = 4 visual tokens), written to its mcvqa.yaml."""
    min_pixels: int = 32 * 32
    """Image processor floor: the real Qwen3-VL's 256 x 256 floor would upscale the tiny model's 64 x 64 images."""
    seed: int = 0


def train_tokenizer(lines: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: any text encodes, letters are single tokens
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def tokenizer_corpus(include_system_prompts: bool = True) -> list[str]:
    """What the tiny tokenizer is trained on: prompts, the chat template's words, synthetic questions and options."""
    from mcvqa.synth import corpus_lines

    lines: list[str] = []
    for name in BUILTIN:
        p = load_prompt(name)
        # Repeated so the few-shot prompt compresses into long merges: the cached prefix stays short on CPU.
        lines += ([p.system] if include_system_prompts else []) * 20 + [p.question_template, p.options_header, p.instruction] * 20
    lines += ["system\n", "user\n", "assistant\n"] * 50
    lines += corpus_lines() * 20
    lines += ["a. b. c. d. a b c d A B C D", "0123456789", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"] * 5
    return lines


def local_tokenizer(vocab_size: int, extra_tokens: Sequence[str] = (), chat_template: str = CHAT_TEMPLATE,
                    named: dict[str, str] | None = None, include_system_prompts: bool = True) -> Any:
    """A ``Qwen2Tokenizer`` around a BPE trained here, with Qwen's special tokens plus ``extra_tokens`` (a family's
    image markers); ``named`` gives tokens the attribute names a processor reads (``tokenizer.image_token``)."""
    from transformers import Qwen2Tokenizer

    bpe = train_tokenizer(tokenizer_corpus(include_system_prompts), vocab_size)
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    kwargs: dict[str, Any] = {"extra_special_tokens": dict(named)} if named else {}
    tokenizer = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges, model_max_length=32768, **kwargs)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, *extra_tokens)])
    tokenizer.chat_template = chat_template
    return tokenizer


def build_processor(vocab_size: int, min_pixels: int, include_system_prompts: bool = True) -> tuple[Any, dict[str, int]]:
    """A real Qwen3VLProcessor around a locally trained tokenizer; returns it and the special-token ids."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    bpe = train_tokenizer(tokenizer_corpus(include_system_prompts), vocab_size)
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": 16384 * 32 * 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )
    return processor, ids
