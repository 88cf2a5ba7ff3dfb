"""Gemma 4: sliding-window and global layers, image tokens that see each other both ways on sliding layers,
keys/values shared by the last layers (E4B), a soft-capped head, and a template that may open a thought channel.

transformers builds Gemma 4's masks from ``mm_token_type_ids`` of the tokens in the forward call, indexed as if
the call started at position 0; after a cached prefix its image blocks would land ``prefix`` positions off.
So this family always hands the model its masks, one per layer type, built here from positions: global layers
causal (and whatever ``allowed`` adds, e.g. option segments kept apart), sliding layers the same OR "same image",
AND within the window. The 31B template emits an empty ``<|channel>thought ... <channel|>`` at the generation
prompt; it is part of the frame's tail, so the answer is read after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mcvqa.families.base import Family


class Gemma4(Family):
    name = "gemma4"
    model_types = ("gemma4",)
    processor_classes = ("Gemma4Processor",)
    first_class = True
    image_placeholder = "<|image|>"
    prefix_cache = True
    packed = True
    skip_quant = ("model.vision_tower", "vision_tower", "model.embed_vision", "embed_vision", "model.audio_tower",
                  "audio_tower", "model.embed_audio", "embed_audio", "lm_head")
    vision_pad = {"image_position_ids": -1}

    def layer_kinds(self, core: Any) -> list[str]:
        return ["none" if layer.self_attn.is_kv_shared_layer else "kv" for layer in self.decoder_layers(core)]

    def _text_config(self, core: Any) -> Any:
        return self.text_model(core).config

    def attention_mask(self, core: Any, allowed: torch.Tensor | None, positions: torch.Tensor, mm: torch.Tensor, prefix_len: int) -> Any:
        cfg = self._text_config(core)
        q_pos = self.text_positions(positions)  # (B, S)
        b = q_pos.shape[0]
        device = q_pos.device
        kv_pos = torch.cat([torch.arange(prefix_len, device=device).view(1, -1).expand(b, -1), q_pos], dim=1)  # (B, P+S)
        if allowed is None:
            allowed = kv_pos[:, None, :] <= q_pos[:, :, None]  # causal (right padding: positions rise along a row)
        sliding = allowed
        if getattr(cfg, "use_bidirectional_attention", None) == "vision":
            vision = mm != 0
            start = vision & ~torch.nn.functional.pad(vision, (1, 0))[:, :-1]
            block = torch.where(vision, torch.cumsum(start.int(), dim=1), 0)  # 1, 2, ... per image; 0 text
            same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
            # An image token sees the later tokens of its own image, but only where it may see that segment at all.
            visible_segment = allowed[:, :, prefix_len:] | allowed[:, :, prefix_len:].transpose(1, 2)
            sliding = allowed.clone()
            sliding[:, :, prefix_len:] |= same & visible_segment
        window = getattr(cfg, "sliding_window", None)
        if window:
            sliding = sliding & (kv_pos[:, None, :] > q_pos[:, :, None] - window)
        return {"full_attention": allowed[:, None], "sliding_attention": sliding[:, None]}

    def head_logits(self, head: torch.nn.Module, hidden: torch.Tensor, token_ids: Sequence[int] | None = None) -> torch.Tensor:
        logits = super().head_logits(head, hidden, token_ids)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None) if self.config is not None else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def shrink_text(self, text: Any, spec: Any) -> None:
        # Global layers' own head_dim (512 vs 256) lives in per-layer overrides keyed by layer index: re-key it.
        overrides = text.to_dict().get("per_layer_config") or {}
        global_head_dim = next((v["head_dim"] for v in overrides.values() if isinstance(v, dict) and "head_dim" in v), None)
        text.per_layer_config = None
        super().shrink_text(text, spec)
        shared = int(getattr(text, "num_kv_shared_layers", 0) or 0)
        n = max(2, spec.num_hidden_layers) * (2 if shared else 1)
        text.num_hidden_layers = n
        # Both layer types, the global one last (as in every Gemma 4 block); with key/value sharing the second
        # half reuses the first half's keys and values, as E4B's last 18 of 42 layers do.
        text.layer_types = (["sliding_attention"] * (n // (2 if shared else 1) - 1) + ["full_attention"]) * (2 if shared else 1)
        text.num_kv_shared_layers = n // 2 if shared else 0
        if global_head_dim:
            text.per_layer_config = {i: {"head_dim": global_head_dim} for i, t in enumerate(text.layer_types) if t == "full_attention"}
        text.num_global_key_value_heads = spec.num_key_value_heads
        text.sliding_window = 48  # shorter than a tiny question: the tests cross the window
        if getattr(text, "hidden_size_per_layer_input", 0):
            text.hidden_size_per_layer_input = 8

    def shrink(self, config: Any, spec: Any) -> Any:
        config = super().shrink(config, spec)
        config.audio_config = None  # mcvqa never feeds audio; the tower would dominate a tiny model
        return config
