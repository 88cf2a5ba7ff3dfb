"""Attention and compile kernels: process-wide settings, applied by an explicit call from the model loader.

Nothing here runs at import. :func:`register` names our attention functions to transformers (its registries are
process-wide); :func:`use_causal_attention` switches one loaded model to them; :func:`compile_blocks` compiles its
repeated blocks (and raises torch's dynamo cache limit only then, only as far as that model needs).
Both are exact rewrites of transformers' SDPA path: same arithmetic, fewer kernels (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn.functional as F

from mcvqa.config import COMPILE_SCOPES
from mcvqa.runtime import to_device

CAUSAL_ATTENTION = "mcvqa_sdpa"


def _causal_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA whose mask-free case is causal aligned to the bottom right (queries are the last q of kv keys).

    transformers' SDPA path materialises a (B, 1, S, P+S) mask as soon as a cache holds a prefix, which
    keeps PyTorch off its flash kernel and repeats grouped key/value heads. ``causal_lower_right`` states the
    same pattern without a tensor, so the fused kernels and native grouped-query attention are used. A mask that
    carries a :class:`PackedRows` layout (training's packed rows) is attended row by row after the prefix
    (:func:`_packed_rows_sdpa`). Any other real mask (built by :func:`_causal_mask`) falls back to transformers' SDPA.
    """
    rows = getattr(attention_mask, PackedRows.ATTRIBUTE, None)
    if rows is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] == rows.total:
        return _packed_rows_sdpa(module, query, key, value, rows, dropout, scaling), None
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        with _without_cudnn(query):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return _bottom_right_causal(module, query, key, value, dropout, scaling).transpose(1, 2).contiguous(), None


def _bottom_right_causal(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None) -> torch.Tensor:
    """(B, Hq, q, D) attention of the last q of kv positions, causal, grouped heads native on CUDA."""
    from torch.nn.attention.bias import causal_lower_right

    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if gqa and not _native_gqa(query):
        # CPU kernels take the materialising path, where grouped heads must be repeated explicitly.
        from transformers.integrations.sdpa_attention import repeat_kv

        n_rep = query.shape[1] // key.shape[1]
        key, value, gqa = repeat_kv(key, n_rep), repeat_kv(value, n_rep), False
    bias = None if q_len == kv_len else causal_lower_right(q_len, kv_len)
    with _without_cudnn(query):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, is_causal=bias is None and q_len > 1,
            dropout_p=dropout if module.training else 0.0, scale=scaling, **({"enable_gqa": True} if gqa else {}),
        )


def _without_cudnn(query: torch.Tensor) -> Any:
    """On CUDA, SDPA's backends other than cuDNN's, for the language model's attention.

    cuDNN keys each compiled attention graph by the lengths and strides of its tensors, and the language model's change
    from one batch to the next: a packed step's total length sets the strides of its prefix slice, padded rows and
    real masks (Gemma's windows, the dense packed mask) set the lengths. Nearly every call would then build a new
    graph on the host, about a millisecond forward and two backward, while the GPU waits (the training profile in
    BENCHMARKS.md, eighth session). Flash attention takes the same calls with no per-shape set-up; a real mask goes to
    the memory-efficient kernel. The vision tower keeps SDPA's choice: a letterboxed batch has one shape throughout.
    """
    if not _on_cuda(query):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _native_gqa(query: torch.Tensor) -> bool:
    """Whether SDPA takes grouped key/value heads as they are: CUDA kernels, torch 2.5 or later (``enable_gqa``); CPU
    kernels take the materialising path, where grouped heads must be repeated explicitly."""
    from mcvqa.compat import version_tuple

    return query.device.type == "cuda" and version_tuple(torch.__version__)[:2] >= (2, 5)


class PackedRows:
    """Layout of a packed sequence ``[prefix, row 1, ..., row B]`` in which each row sees the prefix and its own
    earlier tokens (:func:`mcvqa.scoring.packed_answer_hidden`), attached to that forward's dense mask as the attribute
    :attr:`ATTRIBUTE`. The mask object travels unchanged to every layer (transformers returns a 4-D mask as it is, and
    a checkpointed layer's recomputation receives the same object), so :func:`_causal_sdpa` finds the layout there in
    the forward and in the recomputation alike, and the mask stays the truth for every other attention kernel."""

    ATTRIBUTE = "mcvqa_packed_rows"

    def __init__(self, prefix: int, lengths: list[int]):
        self.prefix = prefix
        self.lengths = list(lengths)
        self.total = prefix + sum(self.lengths)
        self._indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def attach(self, mask: Any) -> Any:
        if isinstance(mask, torch.Tensor):
            setattr(mask, self.ATTRIBUTE, self)
        return mask

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``gather`` (B * S,): the packed position of each (row, slot), a padding slot pointing at its row's first token;
        ``real`` (N,): the slots that hold tokens, in packed order. Built on the host once per forward."""
        if device not in self._indices:
            lengths = torch.tensor(self.lengths)
            slot = torch.arange(int(lengths.max()))[None]
            starts = self.prefix + lengths.cumsum(0) - lengths
            holds = slot < lengths[:, None]
            gather = (starts[:, None] + torch.where(holds, slot, 0)).reshape(-1)
            real = torch.nonzero(holds.reshape(-1)).reshape(-1)
            self._indices[device] = (to_device(gather, device), to_device(real, device))
        return self._indices[device]


def _packed_rows_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: PackedRows, dropout: float, scaling: float | None) -> torch.Tensor:
    """Attention over a packed ``[prefix, rows]`` sequence as the prefix's causal attention plus each row's bottom-right
    causal attention over ``[prefix, row]``, the rows laid side by side (B, S) with right padding.

    The same scores as the dense mask (a padding slot comes after every real token of its row, so causality keeps it
    out of their view), but the kernels skip what the mask would zero: a dense (T, T) mask makes SDPA compute all T^2
    scores, of which the rows need about B * S * (P + S). ``query``/``key``/``value``: (1, H, T, D). Returns (1, T, Hq, D).
    """
    p, b, width = rows.prefix, len(rows.lengths), max(rows.lengths)
    gather, real = rows.indices(query.device)
    d = query.shape[3]

    def side_by_side(t: torch.Tensor) -> torch.Tensor:  # (1, H, T, D) -> (B, H, S, D)
        return t[0].index_select(1, gather).view(t.shape[1], b, width, d).transpose(0, 1)

    pk, pv = key[:, :, :p], value[:, :, :p]
    k = torch.cat([pk.expand(b, -1, -1, -1), side_by_side(key)], dim=2)
    v = torch.cat([pv.expand(b, -1, -1, -1), side_by_side(value)], dim=2)
    out_rows = _bottom_right_causal(module, side_by_side(query), k, v, dropout, scaling)  # (B, Hq, S, D)
    out_rows = out_rows.transpose(1, 2).reshape(b * width, query.shape[1], d).index_select(0, real)
    if not p:
        return out_rows[None]
    out_prefix = _bottom_right_causal(module, query[:, :, :p], pk, pv, dropout, scaling)[0].transpose(0, 1)
    return torch.cat([out_prefix, out_rows], dim=0)[None]


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
    # on the host: see host_grid_vision (no boundaries: one image of all the patches)
    lengths = [total] if cu_seq_lens_q is None else (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    if lengths and all(n == lengths[0] for n in lengths):  # one size (a letterboxed batch): one call, no copy back
        n, length = len(lengths), lengths[0]
        q, k, v = (t[0].reshape(t.shape[1], n, length, t.shape[3]).transpose(0, 1) for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if module.training else 0.0, scale=scaling)
        return o.permute(0, 2, 1, 3).reshape(1, n * length, query.shape[1], query.shape[3]), None
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


_QWEN3_VISION = ("Qwen3VL", "Qwen3_5")
"""Model class prefixes whose vision tower is Qwen3-VL's (2-D RoPE, learned positions resampled per grid, packed
images with ``cu_seqlens``)."""


def use_causal_attention(core: Any) -> bool:
    """Switch ``core``'s language model (the model inside ``ForConditionalGeneration``) from ``sdpa`` to :func:`_causal_sdpa` (exact; faster with a cached prefix).

    A Qwen3-VL-style vision tower gets :func:`_vision_sdpa` (one call per run of equal-size images) and
    :func:`host_grid_vision`. Returns whether anything switched.
    """
    register()
    cfg = core.language_model.config
    if cfg._attn_implementation != "sdpa":
        return False
    cfg._attn_implementation = CAUSAL_ATTENTION
    visual = getattr(core, "visual", None)
    if visual is not None and type(core).__name__.startswith(_QWEN3_VISION):
        if visual.config._attn_implementation == "sdpa":
            visual.config._attn_implementation = VISION_ATTENTION
        host_grid_vision(visual)
        patch_embed_as_matmul(visual)
    if type(core).__name__.startswith("Qwen3VL"):
        levels = getattr(getattr(core.config, "vision_config", None), "deepstack_visual_indexes", None) or ()
        answer_only_last_layer(core.language_model, len(levels))
    merge_without_sync(core)
    return True


_QWEN_MERGE = ("Qwen2VL", "Qwen2_5_VL", "Qwen3VL", "Qwen3_5")
"""Model class prefixes whose image features are merged into the text by transformers' Qwen placeholder mask (and,
for Qwen3-VL, DeepStack): the forwards :func:`merge_without_sync` replaces."""


def merge_without_sync(core: Any) -> bool:
    """Merge a Qwen model's image features into its text without the host waiting for the GPU.

    transformers' merge waits for the GPU up to eight times a forward: the placeholder check formats a CUDA count
    into its message and reads the check back, and each of Qwen3-VL's three DeepStack layers indexes the hidden
    states with a boolean mask twice (a read to count it, a write). After each wait the GPU idles until the host
    has queued the next kernels.

    * The placeholder check runs as transformers' on the first forward with image features (a processor that
      disagrees with the model gets transformers' readable error, not a CUDA assert that ends the process) and on
      devices without ``torch._assert_async`` (MPS); after that it is asserted on the device.
    * DeepStack adds each visual row to its position through a gather and ``where``: the same bf16 sum at image
      positions, ``x + (-0.0) = x`` everywhere else (signed zeros and NaNs kept), so bit for bit transformers'
      result, gradients included.

    Returns whether it applied (a Qwen core whose forwards have these methods); :func:`restore_merge` undoes it.
    """
    if not type(core).__name__.startswith(_QWEN_MERGE) or getattr(core, "merges_without_sync", False):
        return False
    if not hasattr(type(core), "get_placeholder_mask"):
        return False
    original = type(core).get_placeholder_mask
    checked = [False]

    def get_placeholder_mask(input_ids: Any, inputs_embeds: torch.Tensor, image_features: torch.Tensor | None = None,
                             video_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        features = (image_features, video_features)
        # CPU and CUDA have the device-side assert (on the CPU it raises at once); other devices keep transformers' check.
        if input_ids is None or input_ids.device.type not in ("cpu", "cuda") or (not checked[0] and any(f is not None for f in features)):
            masks = original(core, input_ids, inputs_embeds, image_features, video_features)
            checked[0] = checked[0] or (input_ids is not None and any(f is not None for f in features))
            return masks
        out = []
        for token, feats, kind in ((core.config.image_token_id, image_features, "image"), (core.config.video_token_id, video_features, "video")):
            mask = input_ids == token
            if feats is not None:
                torch._assert_async(mask.sum() * inputs_embeds.shape[-1] == feats.numel(), f"{kind} tokens and {kind} features disagree")
            out.append(mask.unsqueeze(-1).to(inputs_embeds.device))
        return out[0], out[1]

    core.get_placeholder_mask = get_placeholder_mask
    text = getattr(core, "language_model", None)
    if text is not None and hasattr(type(text), "_deepstack_process"):

        def _deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
            embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
            if embeds.shape[0] == 0:
                return hidden_states
            flat = visual_pos_masks.to(hidden_states.device).reshape(-1)
            row = (torch.cumsum(flat, 0) - 1).clamp_min(0)  # the visual row of each image position (0 elsewhere)
            # -0.0 as a Python scalar: a 0-d tensor made from host data would be a blocking copy to the GPU, once per
            # DeepStack layer (the profile's last host wait); the scalar rides in the kernel's arguments, sign kept
            added = torch.where(flat[:, None], embeds[row], -0.0)
            return hidden_states + added.view_as(hidden_states)

        text._deepstack_process = _deepstack_process
    core.merges_without_sync = True
    return True


def restore_merge(core: Any) -> None:
    """Undo :func:`merge_without_sync` on ``core`` (transformers' methods back)."""
    for owner, name in ((core, "get_placeholder_mask"), (getattr(core, "language_model", None), "_deepstack_process")):
        if owner is not None and name in vars(owner):
            delattr(owner, name)
    core.merges_without_sync = False


def host_grid_vision(visual: Any) -> bool:
    """Let a Qwen3-VL-style vision tower take its image grid on the host, with nothing computed per batch that the grid fixes.

    transformers' forward derives four things from ``grid_thw`` before the blocks run: the learned position table's
    resampling indices and weights, the 2-D RoPE positions and ``cu_seqlens``, each with a Python loop over images
    and ``tolist()`` reads, and the attention reads ``cu_seqlens`` again in every block. With the grid on the GPU
    each read waits for the GPU (27 blocks: 27 waits a batch). This forward computes them on the host, once per
    distinct grid (a letterboxed batch has one), keeps ``cu_seqlens`` there for :func:`_vision_sdpa`, and hands
    them to transformers' own forward, whose helpers take precomputed values from its keyword arguments.
    Same tensors, same arithmetic. A grid on the GPU is read once (one wait instead of ~30). Returns whether it
    applied (the forward must have the helpers this relies on; other versions keep theirs).
    """
    import sys

    namespace = sys.modules.get(type(visual).__module__)
    names = ("get_vision_interpolation_indices_and_weights", "get_vision_position_ids", "get_vision_attention_seqlens")
    helpers = [getattr(namespace, n, None) for n in names]
    attrs = ("num_grid_per_side", "interpolation_mode", "interpolation_align_corners", "spatial_merge_size")
    if any(h is None for h in helpers) or not all(hasattr(visual, a) for a in attrs) or getattr(visual, "reads_host_grid", False):
        return False
    interpolation, vision_positions, seqlens = helpers
    original = type(visual).forward
    cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def precomputed(grid: tuple[tuple[int, ...], ...], device: torch.device) -> dict[str, Any]:
        host = torch.tensor(grid, dtype=torch.long)
        indices, weights = interpolation(
            host, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
        )
        cu_seqlens, max_seqlen = seqlens(host, visual.config)
        if max_seqlen is None:  # transformers only measures it for flash attention; ours reads it on the host
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(grid) else 0
        ours = visual.config._attn_implementation == VISION_ATTENTION or "flash" not in str(visual.config._attn_implementation)
        return {
            "interp_indices": to_device(indices, device),
            "interp_weights": to_device(weights, device),
            "position_ids": to_device(vision_positions(host, visual.spatial_merge_size), device),
            # Kept on the host for attention that reads it there (ours, SDPA's per-image loop); a flash kernel needs it on the GPU.
            "cu_seqlens": cu_seqlens if ours else to_device(cu_seqlens, device),
            "max_seqlen": max_seqlen,
        }

    def forward(hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        if any(k in kwargs for k in ("interp_indices", "position_ids", "cu_seqlens")):  # the caller precomputed them
            return original(visual, hidden_states, grid_thw, **kwargs)
        grid = tuple(tuple(int(x) for x in row) for row in grid_thw.tolist())  # no wait for a host grid
        key = (grid, hidden_states.device, str(visual.config._attn_implementation))
        pre = cache.get(key)
        if pre is None:
            if len(cache) >= 16:  # native-resolution batches rarely repeat a grid: keep the cache small
                cache.clear()
            pre = cache[key] = precomputed(grid, hidden_states.device)
        return original(visual, hidden_states, grid_thw, **pre, **kwargs)

    visual.forward = forward
    visual.reads_host_grid = True
    return True


def patch_embed_as_matmul(visual: Any) -> bool:
    """The vision tower's patch embedding (a Conv3d whose kernel equals its stride, over inputs already cut into
    patches) as the one matrix product it is: cuDNN's 3-D convolution is several times slower for this shape.
    Exact up to summation order. Returns whether it applied."""
    embed = getattr(visual, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride) or proj.padding != (0, 0, 0) or proj.groups != 1:
        return False
    width = proj.in_channels * int(torch.tensor(proj.kernel_size).prod())

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if embed.proj is not proj:  # replaced since (a LoRA wrapper on the patch embedding): the module's own forward
            return type(embed).forward(embed, hidden_states)
        w = proj.weight
        return F.linear(hidden_states.reshape(-1, width).to(w.dtype), w.reshape(w.shape[0], width), proj.bias)

    embed.forward = forward
    return True


def compile_blocks(core: Any, scope: str = "layers", backend: str = "inductor") -> int:
    """``torch.compile`` the repeated blocks of ``core`` in place; returns how many modules were compiled.

    What is left once the prefix is cached is mostly elementwise work between the matrix products (RMSNorm in
    fp32, q/k norms, RoPE, SiLU x up, residual adds): each is a separate kernel reading and writing the whole
    activation. Compiling fuses them. ``mlp`` compiles only the cache-free submodules (norms and MLPs; cheap to
    compile, no guards on the cache); ``layers`` compiles whole decoder layers (also fuses RoPE and the
    residuals); ``vision`` compiles only the vision blocks' norms and MLPs (for a language model already fused by
    :func:`fuse`). Vision blocks get their norms and MLPs compiled in every scope. Shapes are dynamic, so
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
    if scope == "vision":  # the language model's elementwise work is fused by :func:`fuse` instead
        pass
    elif scope == "layers":
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




# ------------------------------------------------------------------------------------------ fused elementwise



class FusedOps:
    """The three elementwise chains a decoder layer repeats, as functions of tensors.

    :data:`TORCH_OPS` restates transformers' own arithmetic and runs anywhere (the CPU tests swap it in to prove the
    wiring: the right modules, offsets and epsilons, gate and up the right way round, RoPE's rotation); :func:`liger_ops`
    gives Liger's Triton kernels, one pass over the activation each instead of several (BENCHMARKS.md, "Speed II"),
    for CUDA tensors only: anything else takes the model's own code.
    """

    name = "torch"
    runs_on_cpu = True

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype) if offset == 0.0 else (h * (weight.float() + offset)).to(dtype)

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def rotate_half(x: torch.Tensor) -> torch.Tensor:
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        # Liger's kernel reads only the left half of the tables (it assumes ``cat(freqs, freqs)``): so does this
        # restatement, so a model whose tables have unequal halves fails the CPU wiring tests instead of rotating
        # wrongly on the GPU alone.
        half = cos.shape[-1] // 2
        cos, sin = (torch.cat((t[..., :half], t[..., :half]), dim=-1).unsqueeze(1) for t in (cos, sin))
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def applies(self, t: torch.Tensor) -> bool:
        return t.is_cuda or self.runs_on_cpu


TORCH_OPS = FusedOps()


class _OptionalLigerBackends(logging.Filter):
    """Drops Liger's warning that a vendor backend it probes for (``liger_kernel.ops.backends._cutedsl``, ``._ascend``:
    CUTLASS's Python DSL, Huawei's NPUs) could not be imported. Liger falls back to its Triton kernels, which are the
    ones mcvqa uses, so the warning is noise printed on every GPU run; every other Liger warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        return not ("could not be imported" in str(record.msg) and ".backends._" in str(path))


_LIGER_REGISTRY_LOG = "liger_kernel.backends.registry"


def warm_triton_key() -> Any:
    """Start computing Triton's cache key in a daemon thread; the thread, or None where Triton has no such key.

    Triton keys every kernel it compiles or finds in its disk cache by a hash of its own installation, its ~400 MB
    compiler library included, computed once a process at the first Triton kernel: Liger's first launch in the first
    batch, with the GPU waiting (BENCHMARKS.md, "Speed II", twelfth session). Reading the file and hashing it release
    the GIL, so the load computes it beside the weights' copy instead. Call it once Triton is imported (the
    processor's imports bring it in): the thread then imports nothing that the main thread may be importing."""
    import threading

    try:
        from triton.runtime.cache import triton_key
    except Exception:  # no Triton, or one that keys its cache otherwise: the first kernel computes what it needs
        return None

    def run() -> None:
        try:
            triton_key()
        except Exception:  # best effort: the first kernel computes it again and reports any real problem
            pass

    thread = threading.Thread(target=run, name="mcvqa-triton-key", daemon=True)
    thread.start()
    return thread


def liger_ops() -> FusedOps | None:
    """Liger's kernels as :class:`FusedOps`; None when liger-kernel (or Triton) is not installed."""
    registry_log = logging.getLogger(_LIGER_REGISTRY_LOG)
    if not any(isinstance(f, _OptionalLigerBackends) for f in registry_log.filters):
        registry_log.addFilter(_OptionalLigerBackends())  # before Liger's first dispatch, which probes the backends
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:  # ImportError, or Triton failing to initialise on this machine
        logging.getLogger("mcvqa").debug("liger-kernel unavailable: %s", e)
        return None

    class Liger(FusedOps):
        name = "liger"
        runs_on_cpu = False

        @staticmethod
        def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
            # "llama" casting: normalise in fp32, cast, then scale (transformers' order); "gemma": scale in fp32.
            mode = "llama" if offset == 0.0 else "gemma"
            return LigerRMSNormFunction.apply(x, weight, eps, offset, mode, False)

        @staticmethod
        def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            return LigerSiLUMulFunction.apply(gate, up)

        @staticmethod
        def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return liger_rotary_pos_emb(q, k, cos, sin)

    return Liger()


def _fused_norm_forward(ops: FusedOps, module: torch.nn.Module, offset: float) -> Any:
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not ops.applies(x):
            return type(module).forward(module, x)
        return ops.rms_norm(x, module.weight, eps, offset)

    return forward


def _fused_mlp_forward(ops: FusedOps, mlp: torch.nn.Module) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not ops.applies(x):
            return type(mlp).forward(mlp, x)
        return mlp.down_proj(ops.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))

    return forward


def _rope_wrapper(ops: FusedOps, original: Any) -> Any:
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # Only the plain (B, H, S, D) x (B, S, D) case; anything else (partial rotary, other layouts) stays as it was.
        if ops.applies(q) and not args and not kwargs and cos.dim() == 3 and q.shape[-1] == cos.shape[-1]:
            return ops.rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._mcvqa_fused = True  # type: ignore[attr-defined]
    apply_rotary_pos_emb._mcvqa_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


_VISION_ROPE_MODULES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
"""Model modules whose ``apply_rotary_pos_emb_vision`` rotates full-width heads with duplicated halves of
``cos``/``sin`` (``cat(freqs, freqs)``), in fp32, and casts back: what :meth:`FusedOps.rope` computes (Liger's kernel
reads only the left half of ``cos``, so a table with unequal halves would be wrong under it)."""


def _vision_rope_wrapper(ops: FusedOps, original: Any) -> Any:
    def apply_rotary_pos_emb_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        # (patches, heads, d) with (patches, d) tables, as (1, heads, patches, d): the language model's layout, so one
        # fused kernel replaces transformers' ~14 passes over q and k in fp32 (casts, rotate_half's slices, neg and
        # cat, four products, two sums, casts back). The tables stay fp32: the rotation is computed in fp32 as before.
        # One table row per patch (Liger indexes rows by position, unchecked), full-width heads: otherwise as it was.
        plain = q.dim() == 3 and cos.dim() == 2 and sin.shape == cos.shape and k.shape[:1] == q.shape[:1] == cos.shape[:1]
        if not (ops.applies(q) and plain and q.shape[-1] == cos.shape[-1] == k.shape[-1]):
            return original(q, k, cos, sin)
        rq, rk = ops.rope(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos.float().unsqueeze(0), sin.float().unsqueeze(0))
        return rq.transpose(1, 2)[0].to(q.dtype), rk.transpose(1, 2)[0].to(k.dtype)

    apply_rotary_pos_emb_vision._mcvqa_fused = True  # type: ignore[attr-defined]
    apply_rotary_pos_emb_vision._mcvqa_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb_vision


def fuse_vision_rope(visual: Any, ops: FusedOps) -> int:
    """Route a Qwen-VL-style vision tower's 2-D RoPE through ``ops.rope`` (swapped in its attention's module namespace,
    process-wide, like :func:`fuse`'s). Returns how many blocks it reaches (0 for other towers)."""
    import sys

    blocks = list(getattr(visual, "blocks", []) or [])
    attn = getattr(blocks[0], "attn", None) if blocks else None
    module = type(attn).__module__ if attn is not None else ""
    namespace = sys.modules.get(module)
    original = getattr(namespace, "apply_rotary_pos_emb_vision", None)
    # transformers' own modules only: a checkpoint's remote code may reuse the file name with other tables.
    if original is None or not module.startswith("transformers.models.") or module.rsplit(".", 1)[-1].removeprefix("modeling_") not in _VISION_ROPE_MODULES:
        return 0
    namespace.apply_rotary_pos_emb_vision = _vision_rope_wrapper(ops, getattr(original, "_mcvqa_original", original))  # type: ignore[union-attr]
    return len(blocks)


def unfuse_rope(text_model: Any, visual: Any = None) -> int:
    """Put transformers' own RoPE functions back where :func:`fuse` or :func:`fuse_vision_rope` swapped them (in the
    module namespaces of ``text_model``'s and ``visual``'s attention). Returns how many it restored."""
    import sys

    owners = [next((layer.self_attn for layer in getattr(text_model, "layers", []) if hasattr(layer, "self_attn")), None)]
    blocks = list(getattr(visual, "blocks", []) or []) if visual is not None else []
    owners.append(getattr(blocks[0], "attn", None) if blocks else None)
    restored = 0
    for owner, name in zip(owners, ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision")):
        namespace = sys.modules.get(type(owner).__module__) if owner is not None else None
        fn = getattr(namespace, name, None)
        if getattr(fn, "_mcvqa_original", None) is not None:
            setattr(namespace, name, fn._mcvqa_original)
            restored += 1
    return restored


def fuse(text_model: Any, ops: FusedOps, norm_offset: float | None, rope: bool = False) -> dict[str, int]:
    """Route ``text_model``'s RMSNorms, SwiGLU MLPs (and, with ``rope``, its RoPE) through ``ops``, in place.

    ``norm_offset``: 0.0 for ``weight * norm(x)`` (Llama, Qwen), 1.0 for ``(1 + weight) * norm(x)`` (Gemma-style),
    None to leave the norms alone. An MLP is fused only when it is ``down(act(gate(x)) * up(x))`` with SiLU; LoRA
    wrappers on its projections keep working (they are called as modules). RoPE is swapped in the attention's own
    module namespace (process-wide, as Liger's own patches are), for the plain layout only. Tensors ``ops`` does not
    apply to (CPU tensors, for Liger) take the model's own code. Returns what was fused, by kind.
    """
    import sys

    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    act_name = str(getattr(getattr(text_model, "config", None), "hidden_act", ""))
    for module in text_model.modules():
        name = type(module).__name__
        if norm_offset is not None and name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.forward = _fused_norm_forward(ops, module, norm_offset)
            counts["rms_norm"] += 1
        elif all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")) and act_name in ("silu", "swish"):
            module.forward = _fused_mlp_forward(ops, module)
            counts["swiglu"] += 1
    if rope:
        attn = next((layer.self_attn for layer in getattr(text_model, "layers", []) if hasattr(layer, "self_attn")), None)
        namespace = sys.modules.get(type(attn).__module__) if attn is not None else None
        original = getattr(namespace, "apply_rotary_pos_emb", None)
        if original is not None:  # the last call's ops hold (a later load may ask for others)
            namespace.apply_rotary_pos_emb = _rope_wrapper(ops, getattr(original, "_mcvqa_original", original))  # type: ignore[union-attr]
            counts["rope"] = sum(hasattr(layer, "self_attn") for layer in text_model.layers)
    return counts


# ------------------------------------------------------------------------------------------ LoRA


def _addmm_lora_forward(module: torch.nn.Module) -> Any:
    """``module``'s forward with the LoRA update added in the epilogue of one ``torch.addmm``.

    peft's LoRA linear computes ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: besides the two small
    products, three passes over the (tokens, out_features) output (the clone, the multiply, the add), and the
    multiply's backward. ``addmm(base(x), lora_A(dropout(x)), lora_B.weight.T, alpha=scaling)`` is the same sum in one
    product whose epilogue adds the base output, as Unsloth's LoRA kernels do: dropout drawn per layer in the same order
    (the same masks in fp32; peft casts a bf16 input to the adapter's fp32 before its dropout, so on a GPU the draws
    are others of the same distribution), the same values up to rounding (one rounding of the sum instead of three). The plain case only: one active vanilla
    adapter (no DoRA or other variant, no LoRA bias), not merged, no per-row adapter names, and either autocast or one
    dtype throughout; anything else takes peft's own forward."""
    cls_forward = type(module).forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        m: Any = module
        active = m.active_adapters
        name = active[0] if len(active) == 1 else None
        if (args or kwargs or name is None or m.disable_adapters or m.merged or name not in m.lora_A
                or name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False) or m.lora_B[name].bias is not None):
            return cls_forward(m, x, *args, **kwargs)
        lora_a, lora_b = m.lora_A[name], m.lora_B[name]
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and not (x.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
            return cls_forward(m, x, *args, **kwargs)
        result = m.base_layer(x)
        if not autocast and result.dtype != x.dtype:
            return cls_forward(m, x, *args, **kwargs)
        low = lora_a(m.lora_dropout[name](x))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), lora_b.weight.t(), alpha=m.scaling[name])
        return out.view(result.shape)

    forward.mcvqa_lora = True  # type: ignore[attr-defined]
    return forward


def fuse_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA linear of ``model`` (plain, 4-bit and 8-bit bitsandbytes bases) the forward of
    :func:`_addmm_lora_forward`, in place; :func:`unfuse_lora` takes it back. Returns how many were fused."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and _linear_lora(module):
            module.forward = _addmm_lora_forward(module)
            count += 1
    return count


def unfuse_lora(model: torch.nn.Module) -> int:
    """peft's own forward back on every LoRA linear :func:`fuse_lora` changed. Returns how many."""
    count = 0
    for module in model.modules():
        if getattr(vars(module).get("forward"), "mcvqa_lora", False):
            del module.forward
            count += 1
    return count


def _linear_lora(module: torch.nn.Module) -> bool:
    """peft's LoRA classes whose forward is ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` on a linear base."""
    return type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("peft.tuners.lora")


# ------------------------------------------------------------------------------------------ the last layer at the answers only


ANSWER_ONLY = "mcvqa_answer_only"
"""Keyword under which a forward hands the decoder layers an :class:`AnswerOnly`: transformers passes a model's extra
keyword arguments down to every decoder layer, and a checkpointed layer's recomputation receives them again."""


class AnswerOnly:
    """The positions whose final hidden states a forward needs, and what each may attend to there.

    ``keep`` (B, K): the positions in each row of the batch; ``allowed`` (B, K, keys): which keys (cached prefix first)
    each of them sees."""

    def __init__(self, keep: torch.Tensor, allowed: torch.Tensor):
        self.keep = keep
        self.allowed = allowed
        self.applied = False
        """Set by the last layer when it ran at ``keep`` only; a forward that did not pass this object down to it (a
        model whose forwards drop unknown keywords) returns every position, and the caller picks them."""


def answer_only_last_layer(text_model: Any, deepstack_levels: int = 0) -> bool:
    """Let ``text_model``'s last decoder layer run at the answer positions only, when a forward asks (:data:`ANSWER_ONLY`).

    Only the answer positions' final hidden states are read (the letters' logits, the training loss), and the last
    layer's outputs feed nothing else: its keys and values are needed at every position, but its queries, attention
    output, residuals, norm and MLP only at the answers (K per row instead of S). Same arithmetic at those positions,
    so the same hidden states. Qwen3-VL's text decoder layer only (q/k norms, plain RoPE), and only where DeepStack
    adds nothing after it. Returns whether it applied."""
    layers = getattr(text_model, "layers", None)
    if not layers or len(layers) <= deepstack_levels:
        return False
    layer = layers[-1]
    if type(layer).__name__ != "Qwen3VLTextDecoderLayer" or getattr(layer, "answers_only", False):
        return False
    from functools import partial

    from transformers.modeling_layers import GradientCheckpointingLayer

    cls_forward = type(layer).forward
    # transformers checkpoints a layer in its __call__ (5.17) or by wrapping the class's forward (later releases): in
    # the second case the forward below, which replaces the class's, must checkpoint itself.
    checkpoints_here = "__call__" not in vars(GradientCheckpointingLayer)

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        spec = kwargs.get(ANSWER_ONLY)
        if spec is None or args:
            return cls_forward(layer, hidden_states, *args, **kwargs)
        run = partial(_answers_only, layer, spec=spec, kwargs=kwargs)
        if checkpoints_here and layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(run, hidden_states)
        return run(hidden_states)

    layer.forward = forward
    layer.answers_only = True
    return True


def _answers_only(layer: Any, hidden: torch.Tensor, spec: AnswerOnly, kwargs: dict[str, Any]) -> torch.Tensor:
    """The decoder layer's forward at ``spec.keep`` only: (B, K, hidden)."""
    import sys

    spec.applied = True
    attn = layer.self_attn
    b, s, width = hidden.shape
    k_rows = spec.keep.shape[1]
    d = attn.head_dim
    at = spec.keep[..., None]
    normed = layer.input_layernorm(hidden)
    keys = attn.k_norm(attn.k_proj(normed).view(b, s, -1, d)).transpose(1, 2)
    values = attn.v_proj(normed).view(b, s, -1, d).transpose(1, 2)
    picked = normed.gather(1, at.expand(b, k_rows, width))
    queries = attn.q_norm(attn.q_proj(picked).view(b, k_rows, -1, d)).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    if cos.shape[0] != b:
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    # transformers' own RoPE (out of place; the fused kernel may rotate in place): queries at their positions only.
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    rope = getattr(rope, "_mcvqa_original", rope)
    _, keys = rope(keys, keys, cos, sin)
    queries, _ = rope(queries, queries, cos.gather(1, at.expand(b, k_rows, cos.shape[-1])), sin.gather(1, at.expand(b, k_rows, sin.shape[-1])))
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx)
    gqa = queries.shape[1] != keys.shape[1]
    if gqa and not _native_gqa(queries):
        from transformers.integrations.sdpa_attention import repeat_kv

        n_rep = queries.shape[1] // keys.shape[1]
        keys, values, gqa = repeat_kv(keys, n_rep), repeat_kv(values, n_rep), False
    with _without_cudnn(queries):
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=spec.allowed[:, None], scale=attn.scaling,
                                             dropout_p=attn.attention_dropout if attn.training else 0.0, **({"enable_gqa": True} if gqa else {}))
    out = attn.o_proj(out.transpose(1, 2).reshape(b, k_rows, -1))
    mid = hidden.gather(1, at.expand(b, k_rows, width)) + out
    return mid + layer.mlp(layer.post_attention_layernorm(mid))
