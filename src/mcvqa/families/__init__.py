"""Model families: one module each, one interface (:class:`~mcvqa.families.base.Family`).

``for_model`` / ``for_config`` pick by ``config.model_type``; ``for_processor`` by the processor (the Encoder
has no model). Model access (``unwrap``, ``core_and_head``, ``decoder_layers``) lives here too: only the families
know where a family keeps its language model and head. Anything else that ``AutoModelForImageTextToText`` loads gets the base :class:`Family`: the
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

def for_config(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    for cls in FAMILIES:
        if model_type in cls.model_types:
            return cls(config)
    return Family(config)


def for_model(model: Any) -> Family:
    return for_config(getattr(unwrap(model), "config", None))


def core_and_head(model: Any) -> tuple[Any, Any]:
    """(the model inside ``...ForConditionalGeneration``, its output head), as its family reaches them."""
    return for_model(model).core_and_head(model)


def decoder_layers(model: Any) -> list[Any]:
    family = for_model(model)
    return family.decoder_layers(family.core_and_head(model)[0])


def prepare_backward(model: Any, log: Any = None) -> None:
    """Before gradients go through ``model`` (training, TENT / SAR / TPT): its family's :meth:`Family.prepare_backward`,
    whose line, if any, goes to ``log``."""
    said = for_model(model).prepare_backward(model)
    if said and log is not None:
        log(said)


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


__all__ = ["FAMILIES", "Family", "core_and_head", "decoder_layers", "for_config", "for_model", "for_processor", "unwrap"]
