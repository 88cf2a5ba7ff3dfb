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

import torch

from mcvqa.families.qwen_vl import QwenVL


def fla_refuses_gated_backward() -> bool:
    """Whether flash-linear-attention, if transformers runs Qwen3.5's gated delta rule on it, will refuse the backward:
    fla raises in its gated ``chunk_bwd_dqkwg`` on Hopper GPUs with Triton >= 3.4.0 (wrong results there, fla #640;
    0.6 lifts it from Triton 3.7.1; torch 2.11 ships 3.6) unless its TileLang backend can run (tilelang installed, a
    usable nvcc, not switched off by FLA_TILELANG=0). Read from fla's own flags; False when fla is absent or cannot
    import (then transformers does not use it)."""
    if importlib.util.find_spec("fla") is None:
        return False
    try:
        from fla import utils
    except Exception:  # noqa: BLE001 - an fla that cannot even import (no Triton, no GPU) is never called
        return False
    if not (getattr(utils, "IS_NVIDIA_HOPPER", False) and getattr(utils, "TRITON_ABOVE_3_4_0", False)):
        return False
    if getattr(utils, "TRITON_ABOVE_3_7_1", False):  # releases without the flag refuse on every Triton >= 3.4
        return False
    try:
        from fla.backends import TileLangBackend

        return not TileLangBackend.can_use()
    except Exception:  # noqa: BLE001 - releases before fla.backends: tilelang installed is what they ask for
        return importlib.util.find_spec("tilelang") is None


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
        forward, forwards that record gradients run transformers' own PyTorch gated delta rule instead (slower, correct:
        the run goes on instead of stopping at its first step); forwards without gradients (validation, prediction)
        keep fla's kernel, whose forward is fine. Process-wide, like transformers' choice of kernel it replaces."""
        if not fla_refuses_gated_backward():
            return None
        from transformers.models.qwen3_5 import modeling_qwen3_5

        installed = modeling_qwen3_5.torch_chunk_gated_delta_rule
        reference = inspect.unwrap(installed)  # transformers wraps its PyTorch function around the kernel it found
        if reference is installed:  # the PyTorch function already, or the rule below (which wraps nothing)
            return None

        def gated_delta_rule(*args: Any, **kwargs: Any) -> Any:
            return (reference if torch.is_grad_enabled() else installed)(*args, **kwargs)

        modeling_qwen3_5.torch_chunk_gated_delta_rule = gated_delta_rule
        return ("Qwen3.5: flash-linear-attention refuses its gated backward kernel on this GPU with this Triton (fla #640); "
                "steps that need gradients run transformers' PyTorch delta rule (slower), prediction keeps fla. "
                "For the fast kernel: pip install tilelang, or Triton >= 3.7.1")

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
