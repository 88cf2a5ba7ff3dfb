"""Model families: one module each, one interface (:class:`~mcvqa.families.base.Family`).

``for_model`` / ``for_config`` pick by ``config.model_type``; ``for_processor`` by the processor (the Encoder
has no model). Anything else that ``AutoModelForImageTextToText`` loads gets the base :class:`Family`: the
plain, uncached path, and a line at load time saying so.
"""

from __future__ import annotations

from typing import Any

from mcvqa.families.base import Family, unwrap
from mcvqa.families.gemma4 import Gemma4
from mcvqa.families.internvl import InternVL
from mcvqa.families.llava_onevision import LlavaOneVision
from mcvqa.families.qwen3_5 import Qwen35
from mcvqa.families.qwen_vl import QwenVL

FAMILIES: tuple[type[Family], ...] = (Qwen35, QwenVL, Gemma4, InternVL, LlavaOneVision)
"""First-class families, most specific first (Qwen3.5 shares Qwen3-VL's processor)."""

ARCHS = ("qwen3_vl", "qwen2_5_vl", "qwen3_5", "gemma4", "internvl", "llava_onevision")
"""``mcvqa tiny --arch`` choices (``config.model_type`` values)."""


def for_config(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    for cls in FAMILIES:
        if model_type in cls.model_types:
            return cls(config)
    return Family(config)


def for_arch(arch: str) -> Family:
    """The family of a ``config.model_type`` named on the command line (``mcvqa tiny --arch``)."""
    from mcvqa.errors import ConfigError

    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    return next(cls() for cls in FAMILIES if arch in cls.model_types)


def for_model(model: Any) -> Family:
    return for_config(getattr(unwrap(model), "config", None))


def for_processor(processor: Any) -> Family:
    name = type(processor).__name__
    tokenizer = type(getattr(processor, "tokenizer", None)).__name__
    if name == "Qwen3VLProcessor" and (tokenizer.startswith("Qwen3_5") or _qwen3_5_vocabulary(processor)):
        return Qwen35()
    for cls in FAMILIES:
        if name in cls.processor_classes:
            return cls()
    return Family()


def _qwen3_5_vocabulary(processor: Any) -> bool:
    """Qwen3.5 shares Qwen3-VL's processor; older transformers also load its tokenizer as ``Qwen2Tokenizer``. Its
    vocabulary tells it apart: 248k tokens against Qwen3-VL's 152k."""
    try:
        return len(processor.tokenizer) > 200_000
    except TypeError:
        return False


__all__ = ["ARCHS", "FAMILIES", "Family", "for_arch", "for_config", "for_model", "for_processor", "unwrap"]
