"""The fused kernels against transformers' own functions on the GPU, at Qwen3-VL-8B's shapes (issue 26).

    python bench/check_kernels.py --out "$OUT"

On the CPU the tests prove the wiring with transformers' arithmetic standing in for the kernels; on a GPU Triton may
round differently (fused multiply-adds, another summation order), so this measures how far each kernel's output is
from transformers' function on the same bf16 inputs: the share of elements bit for bit equal, the largest absolute
difference, and the largest difference relative to the value (to 1 below 1) in units of the dtype's epsilon (about
one rounding step). Writes ``check_kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from gpu_bench import log, versions  # noqa: E402


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, Any]:
    a, b = ours.float(), theirs.float()
    # Relative to the value, but to at least 1: near zero (where RoPE's terms cancel) a relative error means nothing.
    spacing = torch.finfo(theirs.dtype).eps * b.abs().clamp_min(1.0)
    return {"dtype": str(theirs.dtype), "shape": list(theirs.shape), "bit_equal_share": round(float((ours == theirs).float().mean()), 6),
            "max_abs_diff": float((a - b).abs().max()), "max_rel_diff_in_eps": round(float(((a - b).abs() / spacing).max()), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    ap.add_argument("--patches", type=int, default=16 * 1024, help="vision patches (16 letterboxed 512x512 images)")
    ap.add_argument("--tokens", type=int, default=16 * 600, help="language-model tokens of a batch")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen

    from mcvqa.kernels import liger_ops

    ops = liger_ops()
    if ops is None or not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU and liger-kernel")
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict[str, Any]] = []

    def row(name: str, ours: Any, theirs: Any) -> None:
        for i, (o, t) in enumerate(zip(ours, theirs)):
            r = {"kernel": name, "output": i, **compare(o, t)}
            rows.append(r)
            log(r)

    # Vision RoPE: (patches, 16 heads, 72) q and k, fp32 tables with duplicated halves, as the tower builds them.
    theta = 1.0 / (10000 ** (torch.arange(0, 36, 2, device=dev).float() / 36))
    pos = torch.randint(0, 32, (args.patches, 2), device=dev, generator=g).float()
    freqs = torch.cat([pos[:, :1] * theta, pos[:, 1:] * theta], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    q = torch.randn(args.patches, 16, 72, device=dev, dtype=bf16, generator=g)
    k = torch.randn(args.patches, 16, 72, device=dev, dtype=bf16, generator=g)
    fused = ops.rope(q.clone().unsqueeze(0).transpose(1, 2), k.clone().unsqueeze(0).transpose(1, 2), emb.cos().unsqueeze(0), emb.sin().unsqueeze(0))
    # Clones: Liger rotates a contiguous input in place.
    row("vision_rope", [t.transpose(1, 2)[0].to(bf16) for t in fused], qwen.apply_rotary_pos_emb_vision(q, k, emb.cos(), emb.sin()))

    # Language-model RoPE: (1, 32 heads, tokens, 128) q, 8 kv heads, bf16 tables (the text rotary's output dtype).
    inv = 1.0 / (5_000_000 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    t = torch.arange(args.tokens, device=dev).float()[:, None] * inv
    cos, sin = torch.cat([t, t], -1).cos()[None].to(bf16), torch.cat([t, t], -1).sin()[None].to(bf16)
    q = torch.randn(1, 32, args.tokens, 128, device=dev, dtype=bf16, generator=g)
    k = torch.randn(1, 8, args.tokens, 128, device=dev, dtype=bf16, generator=g)
    row("text_rope", ops.rope(q.clone(), k.clone(), cos, sin), qwen.apply_rotary_pos_emb(q, k, cos, sin))

    # RMSNorm over the hidden size and over q/k heads (Qwen3's q_norm, k_norm), transformers' module as the reference.
    for name, width, shape in (("rms_norm_hidden", 4096, (args.tokens, 4096)), ("rms_norm_head", 128, (args.tokens, 32, 128))):
        norm = qwen.Qwen3VLTextRMSNorm(width, eps=1e-6).to(dev, bf16)
        torch.nn.init.normal_(norm.weight, 1.0, 0.1)
        x = torch.randn(*shape, device=dev, dtype=bf16, generator=g)
        row(name, [ops.rms_norm(x, norm.weight, norm.variance_epsilon, 0.0)], [norm(x)])

    # SwiGLU's product: silu(gate) * up at the MLP's width.
    gate = torch.randn(args.tokens, 12288, device=dev, dtype=bf16, generator=g)
    up = torch.randn(args.tokens, 12288, device=dev, dtype=bf16, generator=g)
    row("silu_mul", [ops.silu_mul(gate, up)], [torch.nn.functional.silu(gate) * up])

    out = {"versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (args.out / "check_kernels.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
