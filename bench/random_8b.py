"""The real Qwen3-VL-8B architecture with random bf16 weights, for the GPU benchmarks (no weights can be downloaded;
speed and memory do not depend on the values).

    python bench/random_8b.py /tmp/q8b [--like ../shared/fixtures/qwen3-vl-8b-instruct] [--device cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mcvqa.io import share_files
from mcvqa.tiny.like import LIKE_FILES
from mcvqa.tiny.toolkit import build_processor


def qwen3_vl_8b_config(ids: dict[str, int]) -> Any:
    """Qwen3-VL-8B-Instruct's architecture (FIELD-NOTES): 36 x 4096 text layers, 27-block vision tower, DeepStack."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None,
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def build_random_8b(out: str | Path, device: str = "cuda", like: str | Path | None = None) -> Path:
    """The real Qwen3-VL-8B architecture with random bf16 weights, saved in Hugging Face format (~17 GB).

    For benchmarks where the released weights cannot be downloaded: speed and memory do not depend on the
    values. With ``like`` (a folder holding Qwen3-VL-8B-Instruct's config, tokenizer, chat template and
    processor files, e.g. ``../shared/fixtures/qwen3-vl-8b-instruct``) the config is the real one and the real
    files are copied beside the weights, so token counts are the real ones (the few-shot prompt is 546
    tokens). Without it, the locally trained tokenizer stands in and counts run about 2x too high (BENCHMARKS.md
    marks the rows measured that way).
    """
    import shutil

    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if like is not None:
        like = Path(like)
        config = AutoConfig.from_pretrained(like, local_files_only=True)
        processor, ids = None, None
    else:
        processor, ids = build_processor(4096, 256 * 256, include_system_prompts=False)
        config = qwen3_vl_8b_config(ids)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    if ids is not None:
        model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    if processor is not None:
        processor.save_pretrained(out)
    else:
        for name in LIKE_FILES:
            if (like / name).is_file():  # type: ignore[operator]
                shutil.copyfile(like / name, out / name)  # type: ignore[operator]
    share_files(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--like", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    print(build_random_8b(args.out, args.device, args.like))


if __name__ == "__main__":
    main()
