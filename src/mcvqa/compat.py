"""The supported range of transformers, and the one place that knows how its versions differ.

mcvqa runs on transformers ``TRANSFORMERS_MIN`` .. ``TRANSFORMERS_TESTED`` (pyproject.toml says the same; ``make
test-oldest`` runs the core suite on the low end). The low end is what Unsloth allows, so the reference's own stack
(``model.backend: unsloth``) installs beside mcvqa. Every difference between versions that mcvqa's code meets is
handled here, by feature detection (never by comparing version numbers where the feature itself can be asked), so
a version in between works the same way.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from mcvqa.errors import ModelError

TRANSFORMERS_MIN = "5.17.0"
"""Oldest transformers the code needs (and the newest Unsloth 2026.10 accepts)."""
TRANSFORMERS_TESTED = "5.24.0"
"""Newest transformers the suite ran on."""

FAMILY_MIN_TRANSFORMERS: dict[str, str] = {
    "qwen3_vl": "5.17.0",
    "qwen2_5_vl": "5.17.0",
    "qwen3_5": "5.17.0",
    "gemma4": "5.17.0",
    "internvl": "5.17.0",
    "llava_onevision": "5.17.0",
}
"""Per ``config.model_type``, the oldest transformers whose model code mcvqa's fast path was checked with."""


def version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def require_family(model_type: str | None) -> None:
    """One line naming the version needed when the installed transformers is older than a family's model code."""
    need = FAMILY_MIN_TRANSFORMERS.get(model_type or "")
    have = transformers_version()
    if need is not None and version_tuple(have) < version_tuple(need):
        raise ModelError(f"{model_type} needs transformers >= {need} (installed: {have}); pip install 'transformers>={need}'")


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    # transformers renamed ``past_key_values`` to ``cache`` (the old name is deprecated, then removed).
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(module: Any) -> str:
    """The keyword a model's forward takes its key/value cache under, in the installed transformers."""
    return _cache_kwarg_of(type(module))


def enable_checkpointing(model: Any, every_n_layers: int = 1) -> None:
    """Activation checkpointing of every ``every_n_layers``-th decoder layer, non-reentrant.

    transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``; the old name
    stays as a deprecated alias for a while, so the new one is asked for first."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
