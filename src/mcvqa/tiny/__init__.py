"""Tiny models built here, with no hub: the real architecture classes at toy sizes with random weights, saved in
Hugging Face format, so the ``from_pretrained(path)`` code that loads the 8B loads them too.

:func:`build_tiny` trains a tokenizer locally and uses the family's real processor classes (one module per
architecture, imported only when asked for: a family whose model code needs a newer transformers stops with one
line); :func:`build_tiny_like` takes a real checkpoint folder's non-weight files and shrinks its config the family's
way (:meth:`mcvqa.families.base.Family.shrink`). This package sits above ``families``; nothing in the product
imports it except the CLI and the demo.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from mcvqa.compat import require_family
from mcvqa.errors import ConfigError
from mcvqa.tiny.like import LIKE_FILES, LikeSpec, build_tiny_like, shrink_config
from mcvqa.tiny.toolkit import TinySpec

ARCHS = ("qwen3_vl", "qwen2_5_vl", "qwen3_5", "gemma4", "internvl", "llava_onevision")
"""``mcvqa tiny --arch`` choices (``config.model_type`` values); each has a module here with a ``build``."""


def build_tiny(out: str | Path, spec: TinySpec | None = None, arch: str = "qwen3_vl") -> Path:
    """A tiny ``arch`` model saved to ``out``: tokenizer, processor and randomly initialised weights."""
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    require_family(arch)
    return importlib.import_module(f"mcvqa.tiny.{arch}").build(out, spec or TinySpec())


__all__ = ["ARCHS", "LIKE_FILES", "LikeSpec", "TinySpec", "build_tiny", "build_tiny_like", "shrink_config"]
