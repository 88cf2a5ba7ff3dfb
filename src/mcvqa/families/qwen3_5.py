"""Qwen3.5: Qwen3-VL's vision side and M-RoPE, a hybrid decoder of gated-DeltaNet (linear attention) and full layers.

A cached prefix carries each linear layer's recurrent state and its convolution window, not keys and values
(:class:`mcvqa.scoring.PrefixLinearLayer`). Linear layers read every earlier token of a row whatever the mask
says, so segments cannot share a row: option orders and training use the cached prefix, one row per sequence.
The template opens a ``<think>`` block at the generation prompt; thinking is switched off the template's way
(``enable_thinking=False``), which closes the block, and the answer is read after it.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

from mcvqa.families.qwen_vl import QwenVL


def fla_refuses_gated_backward() -> bool:
    """Whether flash-linear-attention, if transformers runs Qwen3.5's gated delta rule on it, will refuse the backward:
    fla 0.6 raises in its gated ``chunk_bwd_dqkwg`` on Hopper GPUs with Triton 3.4-3.7.0 (wrong results there, fla #640;
    torch 2.11 ships Triton 3.6) unless tilelang is installed. Read from fla's own flags; False when fla is absent or
    does not have them (other releases)."""
    if importlib.util.find_spec("fla") is None or importlib.util.find_spec("tilelang") is not None:
        return False
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception:  # noqa: BLE001 - an fla that cannot even import (no Triton, no GPU) is never called
        return False
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


class Qwen35(QwenVL):
    name = "qwen3_5"
    rms_norm_offset = 1.0  # Qwen3.5's RMSNorm scales by (1 + weight) in fp32
    fused_rope = False  # partial rotary: its own apply_rotary_pos_emb stays
    model_types = ("qwen3_5", "qwen3_5_moe")
    processor_classes = ()  # Qwen3VLProcessor, told apart from Qwen3-VL by its tokenizer (see families.for_processor)
    template_kwargs = {"enable_thinking": False}
    packed = False
    extra_lora_targets = ("in_proj_qkv", "in_proj_z", "out_proj")
    # The gate projections in_proj_a/in_proj_b are 4096 x 32: too small to gain from 4 bits, and they set the decay.
    skip_quant = ("model.visual", "visual", "lm_head", "in_proj_a", "in_proj_b")

    def prepare_backward(self, model: Any) -> str | None:
        """Where fla would refuse the backward (:func:`fla_refuses_gated_backward`), which it does only after a whole
        forward, transformers' own PyTorch gated delta rule takes its place for this process: slower, correct, and
        the run goes on instead of stopping at its first step. Prediction alone keeps fla (its forward is fine)."""
        if not fla_refuses_gated_backward():
            return None
        from transformers.models.qwen3_5 import modeling_qwen3_5

        installed = modeling_qwen3_5.torch_chunk_gated_delta_rule
        reference = inspect.unwrap(installed)  # transformers wraps its PyTorch function around the kernel it found
        if reference is installed:
            return None
        modeling_qwen3_5.torch_chunk_gated_delta_rule = reference
        return ("Qwen3.5: flash-linear-attention refuses its gated backward kernel on this GPU with this Triton (fla #640); "
                "training runs on transformers' PyTorch delta rule (slower). For the fast kernel: pip install tilelang, "
                "or Triton >= 3.7.1")

    def layer_kinds(self, core: Any) -> list[str]:
        types = self.text_model(core).config.layer_types
        return ["linear" if t == "linear_attention" else "kv" for t in types]

    def shrink_text(self, text: Any, spec: Any) -> None:
        super().shrink_text(text, spec)
        n = max(2, spec.num_hidden_layers)
        text.num_hidden_layers = n
        text.layer_types = ["linear_attention"] * (n - 1) + ["full_attention"]  # keep the hybrid: both kinds present
        text.full_attention_interval = n
        text.linear_num_key_heads = spec.num_attention_heads
        text.linear_num_value_heads = spec.num_attention_heads * 2
        text.linear_key_head_dim = 16
        text.linear_value_head_dim = 16
