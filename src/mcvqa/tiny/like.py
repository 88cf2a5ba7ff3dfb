"""A tiny random model from a real checkpoint folder's non-weight files: the real tokenizer, chat template and
processor, the real config at toy sizes (each family's ``shrink``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mcvqa import families
from mcvqa.io import share_files


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
