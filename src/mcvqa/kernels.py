"""Attention and compile kernels: process-wide settings, applied by an explicit call from the model loader.

Nothing here runs at import. :func:`register` names our attention functions to transformers (its registries are
process-wide); :func:`use_causal_attention` switches one loaded model to them; :func:`compile_blocks` compiles its
repeated blocks (and raises torch's dynamo cache limit only then, only as far as that model needs).
Both are exact rewrites of transformers' SDPA path: same arithmetic, fewer kernels (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mcvqa.config import COMPILE_SCOPES

CAUSAL_ATTENTION = "mcvqa_sdpa"


def _causal_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA whose mask-free case is causal aligned to the bottom right (queries are the last q of kv keys).

    transformers' SDPA path materialises a (B, 1, S, P+S) mask as soon as a cache holds a prefix, which
    keeps PyTorch off its flash kernel and repeats grouped key/value heads. ``causal_lower_right`` states the
    same pattern without a tensor, so the fused kernels and native grouped-query attention are used. When a
    real padding mask is needed, :func:`_causal_mask` builds it and this falls back to transformers' SDPA.
    """
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from torch.nn.attention.bias import causal_lower_right

    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if gqa and query.device.type != "cuda":
        # CPU kernels take the materialising path, where grouped heads must be repeated explicitly.
        from transformers.integrations.sdpa_attention import repeat_kv

        n_rep = query.shape[1] // key.shape[1]
        key, value, gqa = repeat_kv(key, n_rep), repeat_kv(value, n_rep), False
    bias = None if q_len == kv_len else causal_lower_right(q_len, kv_len)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, is_causal=bias is None and q_len > 1,
        dropout_p=dropout if module.training else 0.0, scale=scaling, enable_gqa=gqa,
    )
    return out.transpose(1, 2).contiguous(), None


def _causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0, mask_function: Any = None, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask where plain bottom-right causality is the whole story; transformers' SDPA mask otherwise."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    plain = mask_function is causal_mask_function and kv_offset == 0 and q_offset + q_length == kv_length
    if plain and (attention_mask is None or bool(attention_mask.all())):
        return None
    kwargs["allow_is_causal_skip"] = False  # the attention above reads "no mask" as bottom-right causal
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )


# The name must contain "flash": that is what makes Qwen-VL's vision attention hand over the whole batch
# with its cu_seqlens instead of looping over images one SDPA call at a time (27 blocks x B images).
VISION_ATTENTION = "mcvqa_flash_sdpa_varlen"


def _vision_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any = None, dropout: float = 0.0, scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each image of a packed batch: one SDPA call per group of equal-size images.

    ``query``/``key``/``value``: (1, heads, total_patches, d). Returns (1, total_patches, heads, d).
    """
    total = query.shape[2]
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.tensor([0, total], device=query.device)
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    out = torch.empty_like(query)
    start = 0
    i = 0
    while i < len(lengths):
        # Run of consecutive images of the same size -> one batched call (letterbox: the whole batch).
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n, length = j - i, lengths[i]
        stop = start + n * length
        shape = (query.shape[1], n, length, query.shape[3])
        q, k, v = (t[0, :, start:stop].reshape(shape).transpose(0, 1) for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if module.training else 0.0, scale=scaling)
        out[0, :, start:stop] = o.transpose(0, 1).reshape(query.shape[1], n * length, query.shape[3])
        start, i = stop, j
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make the attention functions above known to transformers under their names. Called by the model loader
    (:func:`mcvqa.model.load_model`) before a model is switched to them; idempotent, nothing runs at import."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(CAUSAL_ATTENTION, _causal_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAUSAL_ATTENTION, _causal_mask)
    AttentionInterface.register(VISION_ATTENTION, _vision_sdpa)
    _registered = True


_registered = False


def use_causal_attention(core: Any) -> bool:
    """Switch ``core``'s language model (the model inside ``ForConditionalGeneration``) from ``sdpa`` to :func:`_causal_sdpa` (exact; faster with a cached prefix).

    Only the text decoder changes; the vision tower keeps its own attention. Returns whether it switched.
    """
    register()
    cfg = core.language_model.config
    if cfg._attn_implementation != "sdpa":
        return False
    cfg._attn_implementation = CAUSAL_ATTENTION
    vision_cfg = getattr(core, "visual", None) and core.visual.config
    if vision_cfg is not None and vision_cfg._attn_implementation == "sdpa" and type(core).__name__.startswith("Qwen3VL"):
        vision_cfg._attn_implementation = VISION_ATTENTION
    return True


def compile_blocks(core: Any, scope: str = "layers", backend: str = "inductor") -> int:
    """``torch.compile`` the repeated blocks of ``core`` in place; returns how many modules were compiled.

    What is left once the prefix is cached is mostly elementwise work between the matrix products (RMSNorm in
    fp32, q/k norms, RoPE, SiLU x up, residual adds): each is a separate kernel reading and writing the whole
    activation. Compiling fuses them. ``mlp`` compiles only the cache-free submodules (norms and MLPs; cheap to
    compile, no guards on the cache); ``layers`` compiles whole decoder layers (also fuses RoPE and the
    residuals). Vision blocks get their norms and MLPs compiled in both scopes. Shapes are dynamic, so
    batches of different lengths reuse one graph. Compiling is lazy: the first batch of each new shape pays
    it. The same arithmetic in another kernel order: equal up to float rounding, not bit-identical.
    """
    if scope == "off":
        return 0
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    layers = list(core.language_model.layers)
    blocks = list(getattr(getattr(core, "visual", None), "blocks", []))
    names = ("mlp", "norm1", "norm2")
    # Vision blocks: submodules only. Compiling a whole block with dynamic shapes hands the batched image
    # attention to inductor, whose cuDNN-attention call lost a symbolic size (NameError at run time, torch 2.11).
    targets = [getattr(b, n) for b in blocks for n in names if hasattr(b, n)]
    if scope == "layers":
        # Each layer guards on its own index (it selects its slot of the cache): one graph per layer.
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(layers) + 8)
        targets += layers
    else:
        names = ("mlp", "input_layernorm", "post_attention_layernorm")
        targets += [getattr(layer, n) for layer in layers for n in names if hasattr(layer, n)]
        targets += [getattr(layer.self_attn, n) for layer in layers for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n)]
    for m in targets:
        m.compile(dynamic=True, backend=backend)
    return len(targets)


