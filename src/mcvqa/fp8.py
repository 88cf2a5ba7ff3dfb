"""FP8 weights and activations for the language model's linear layers (``model.quant: fp8``; opt-in, never a default).

Dynamic row-wise scaling, the recipe of torchao's ``float8_dynamic_activation_float8_weight(PerRow())`` and of
vLLM's FP8 path: each weight row (output channel) is scaled into float8_e4m3 once at load; each activation row
(token) is scaled at run time from its own absolute maximum; ``torch._scaled_mm`` multiplies the two on the GPU's
FP8 tensor cores (compute capability 8.9 or newer) and applies both scales in its epilogue. Only the language
model's projections change: the vision tower, its merger, the embeddings and the head keep their bf16 weights.

It changes the numbers (an FP8 round trip per matrix product): BENCHMARKS.md states its agreement with bf16. On a
machine without FP8 matrix units (CPUs, older GPUs) :class:`Fp8Linear` computes the same quantised product in
fp32, so the tests can check the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
_TINY = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, k) -> (float8 rows, (rows, 1) fp32 scales) with ``x ~ q * scale`` and each row's max at the FP8 max."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


_compiled_quantize: Any = None


def _quantize_fast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows`, compiled once into one fused kernel pair on the GPU (eager elsewhere)."""
    global _compiled_quantize
    if not x.is_cuda:
        return quantize_rows(x)
    if _compiled_quantize is None:
        try:
            _compiled_quantize = torch.compile(quantize_rows, dynamic=True)
        except Exception:  # no inductor backend here: eager is correct, only slower
            _compiled_quantize = quantize_rows
    return _compiled_quantize(x)


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(torch.nn.Module):
    """A frozen ``nn.Linear`` with float8 weights scaled per output row and activations quantised per token."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = w.dtype
        q, scale = quantize_rows(w)
        self.weight = torch.nn.Parameter(q, requires_grad=False)  # (out, in), row-major: .t() is column-major
        self.register_buffer("weight_scale", scale.view(1, -1).contiguous())  # (1, out)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(w.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if rows.is_cuda and fp8_supported(rows.device):
            q, scale = _quantize_fast(rows)
            out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype)
        else:
            # The same quantised product in fp32 (what the tensor cores compute, up to accumulation order).
            q, scale = quantize_rows(rows)
            out = (q.float() * scale) @ (self.weight.float() * self.weight_scale.view(-1, 1)).t()
            if self.bias is not None:
                out = out + self.bias.float()
            out = out.to(x.dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 row-wise"


def convert(text_model: torch.nn.Module, names: Iterable[str]) -> int:
    """Replace every ``nn.Linear`` under ``text_model`` whose attribute name is in ``names`` by :class:`Fp8Linear`
    (in place; the bf16 weight is freed as each layer converts). Returns how many were converted."""
    wanted = set(names)
    count = 0
    for parent in list(text_model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in wanted and type(child) is torch.nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(parent, child_name, Fp8Linear(child))
                count += 1
    return count
