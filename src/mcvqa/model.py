"""Loading Qwen-VL checkpoints and adapters. The only module that calls transformers/peft loaders.

Safety: weights load from safetensors only (``use_safetensors=True``; pickle ``.bin`` checkpoints and
adapters are refused), ``trust_remote_code`` stays off unless the config enables it explicitly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from mcvqa.config import LoraConfig, ModelConfig
from mcvqa.errors import ModelError

log = logging.getLogger(__name__)

VISION_LORA_TARGETS = ["qkv", "proj", "linear_fc1", "linear_fc2"]
# transformers matches these from the start of a module's full name (or as a suffix): "model.visual", not "visual".
SKIP_QUANT = ["model.visual", "visual", "lm_head"]


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun / accelerate launch every process owns the GPU of its local rank.
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device={cfg.device} but no CUDA GPU is visible")
    return torch.device(cfg.device)


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]


def _check_local_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found")
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: no config.json; is this a Hugging Face model folder?")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    if not has_safetensors:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")] + [p.name for p in path.glob("*.pth")]
        if pickled:
            raise ModelError(f"{path}: only pickle weights ({pickled[0]}); mcvqa loads safetensors only - convert the checkpoint first")
        raise ModelError(f"{path}: no *.safetensors weights found")


def _check_remote_code(cfg: ModelConfig, path: Path | None) -> None:
    if cfg.trust_remote_code:
        warnings.warn("model.trust_remote_code is on: Python code inside the checkpoint will run", stacklevel=3)
        return
    if path is None:
        return
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(f"{path}: config.json is not valid JSON") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelError(
            f"{path}: the checkpoint ships its own model code (auto_map in config.json); "
            "mcvqa does not run it unless you set model.trust_remote_code=true"
        )
    if any(path.glob("*.py")):
        log.warning("%s ships Python files; they are ignored (trust_remote_code is off)", path)


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype) -> Any | None:
    if cfg.quant == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quant={cfg.quant} needs bitsandbytes: pip install 'mcvqa[gpu]'")
    from transformers import BitsAndBytesConfig

    if cfg.quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # Keep the vision tower and the head in full precision: small, and quantising them costs accuracy.
            llm_int8_skip_modules=SKIP_QUANT,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_QUANT)


def load_processor(name_or_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{name_or_path}: cannot load the processor ({str(e).splitlines()[0]})") from None


def load_model(cfg: ModelConfig, adapter: str | Path | None = None, *, trainable_adapter: bool = False) -> tuple[Any, Any]:
    """(model, processor) on the configured device, in eval mode; with a LoRA adapter when given."""
    from transformers import AutoModelForImageTextToText

    local = Path(cfg.name_or_path).expanduser()
    is_local = local.exists() or cfg.name_or_path.startswith((".", "/", "~"))
    if is_local:
        _check_local_checkpoint(local)
    _check_remote_code(cfg, local if is_local else None)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    qconf = quantization_config(cfg, dtype)
    if qconf is not None and device.type != "cuda" and not os.environ.get("MCVQA_ALLOW_CPU_QUANT"):
        # bitsandbytes can quantise on CPU, but it is only sensible for tests; say so rather than crawl.
        log.warning("4-bit/8-bit weights on CPU are very slow; meant for GPUs")
    name = str(local) if is_local else cfg.name_or_path
    processor = load_processor(name, cfg.trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            quantization_config=qconf,
            device_map={"": str(device)},
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as e:
        raise ModelError(f"{name}: cannot load the model ({str(e).splitlines()[0]})") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{name}: needs custom code; set model.trust_remote_code=true only if you trust it") from None
        raise
    model.eval()
    if cfg.attn_implementation == "sdpa":
        from mcvqa.scoring import use_causal_attention

        use_causal_attention(model)  # same results, fused kernels with a cached prefix (scoring.py)
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=trainable_adapter)
    return model, processor


def load_adapter(model: Any, adapter: str | Path, trainable: bool = False) -> Any:
    from peft import PeftModel

    path = Path(adapter)
    if not path.is_dir():
        raise ModelError(f"{path}: adapter folder not found")
    if not (path / "adapter_config.json").exists():
        raise ModelError(f"{path}: no adapter_config.json; pass the folder written by `mcvqa train` (e.g. runs/t1/best)")
    if not (path / "adapter_model.safetensors").exists():
        if (path / "adapter_model.bin").exists():
            raise ModelError(f"{path}: adapter is a pickle (adapter_model.bin); mcvqa loads safetensors only")
        raise ModelError(f"{path}: no adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    if not trainable:
        peft_model.eval()
    return peft_model


def load_full_weights(model: Any, path: str | Path) -> None:
    """Load full fine-tuned weights (``train.method=full``) saved as safetensors into ``model``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelError(f"{path}: weights do not match the model ({len(unexpected)} unexpected keys, e.g. {unexpected[0]})")


def lora_targets(cfg: LoraConfig) -> list[str]:
    return list(cfg.target_modules) + (VISION_LORA_TARGETS if cfg.vision else [])


def attach_lora(model: Any, cfg: LoraConfig, quantized: bool = False, gradient_checkpointing: bool = True) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (peft). Base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # No prepare_model_for_kbit_training: it upcasts every frozen non-quantised weight (embeddings, head,
    # norms: ~5 GB for an 8B model) to fp32, which bf16 training does not need. get_peft_model freezes the base.
    del quantized, gradient_checkpointing
    targets = lora_targets(cfg)
    if cfg.vision:
        target: Any = targets
    else:
        # Regex on the language model only: robust even if a vision block ever reuses a q_proj-like name.
        target = r".*language_model.*\.(" + "|".join(targets) + r")$"
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        target_modules=target,
        bias="none",
        task_type=None,
    )
    return get_peft_model(model, peft_cfg)


def model_summary(model: Any) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable, "class": type(model).__name__}
