"""A tiny Qwen3-VL built locally: the real architecture classes at toy sizes, saved in Hugging Face format.

No hub access anywhere: a byte-level BPE tokenizer is trained here (Qwen2's pre-tokenizer regex, NFC,
Qwen's special tokens), wrapped in ``Qwen2Tokenizer``; the processor is the real ``Qwen3VLProcessor`` with
the real ``Qwen2VLImageProcessor`` (patch 16, merge 2, as Qwen3-VL); the chat template has Qwen3-VL
Instruct's structure. ``save_pretrained`` writes it all, so tests and the demo load it with exactly the
``from_pretrained(path)`` code that loads Qwen/Qwen3-VL-8B-Instruct.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
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


def build_tiny(out: str | Path, spec: TinySpec | None = None) -> Path:
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


LIKE_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)
"""Non-weight files copied byte for byte from a real checkpoint folder by :func:`build_tiny_like`."""


@dataclass
class LikeSpec:
    """Toy sizes for :func:`build_tiny_like`. Everything not named here is kept from the real config."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_heads: int = 2
    image_size: int = 256
    """Letterbox side written to the model's mcvqa.yaml: the real processor scales anything smaller up to
    its 256 x 256 floor, so 256 is the cheapest honest size (64 visual tokens)."""
    seed: int = 0


def shrink_config(config: Any, spec: LikeSpec) -> Any:
    """The real config at toy sizes, the family's way (:meth:`mcvqa.families.base.Family.shrink`): vocabulary,
    token ids, head_dim and RoPE/M-RoPE, patch and merge sizes stay as they are; DeepStack taps map onto the
    shorter tower; hybrid and sliding/global layer patterns keep both kinds of layer."""
    from mcvqa import families

    return families.for_config(config).shrink(config, spec)


def build_tiny_like(like: str | Path, out: str | Path, spec: LikeSpec | None = None) -> Path:
    """A tiny random model from a real checkpoint folder: its config at toy sizes (:func:`shrink_config`),
    and its tokenizer, chat template and processor files copied byte for byte, so token ids, templates and
    image token counts are the real ones. Saved like any checkpoint: ``from_pretrained(out)`` loads it."""
    import shutil

    from transformers import AutoConfig, AutoModelForImageTextToText

    from mcvqa.errors import ModelError

    spec = spec or LikeSpec()
    like, out = Path(like), Path(out)
    if not (like / "config.json").is_file():
        raise ModelError(f"{like}: no config.json; pass a checkpoint folder (its non-weight files are enough)")
    config = shrink_config(AutoConfig.from_pretrained(like, local_files_only=True), spec)
    torch.manual_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in LIKE_FILES:
        if (like / name).is_file():
            shutil.copyfile(like / name, out / name)
    (out / "mcvqa_tiny.json").write_text(json.dumps({"like": str(like.resolve()), **asdict(spec)}, indent=2) + "\n", encoding="utf-8")
    (out / "mcvqa.yaml").write_text(f"image:\n  mode: letterbox\n  size: {spec.image_size}\n", encoding="utf-8")
    share_files(out)
    return out


def qwen3_vl_8b_config(ids: dict[str, int]) -> Any:
    """Qwen3-VL-8B-Instruct's architecture (FIELD-NOTES): 36 x 4096 text layers, 27-block vision tower, DeepStack."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None,
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def build_random_8b(out: str | Path, device: str = "cuda", like: str | Path | None = None) -> Path:
    """The real Qwen3-VL-8B architecture with random bf16 weights, saved in Hugging Face format (~17 GB).

    For benchmarks where the released weights cannot be downloaded: speed and memory do not depend on the
    values. With ``like`` (a folder holding Qwen3-VL-8B-Instruct's config, tokenizer, chat template and
    processor files, e.g. ``../shared/fixtures/qwen3-vl-8b-instruct``) the config is the real one and the real
    files are copied beside the weights, so token counts are the real ones (the few-shot prompt is 546
    tokens). Without it, the locally trained tokenizer stands in and counts run about 2x too high (BENCHMARKS.md
    marks the rows measured that way).
    """
    import shutil

    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if like is not None:
        like = Path(like)
        config = AutoConfig.from_pretrained(like, local_files_only=True)
        processor, ids = None, None
    else:
        processor, ids = build_processor(4096, 256 * 256, include_system_prompts=False)
        config = qwen3_vl_8b_config(ids)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    if ids is not None:
        model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    if processor is not None:
        processor.save_pretrained(out)
    else:
        for name in LIKE_FILES:
            if (like / name).is_file():  # type: ignore[operator]
                shutil.copyfile(like / name, out / name)  # type: ignore[operator]
    share_files(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out
