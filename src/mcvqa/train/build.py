"""What a run trains: the model (transformers + peft, or Unsloth's FastVisionModel), its parameter groups, the
schedule, and fp16 loss scaling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mcvqa import families
from mcvqa.compat import enable_checkpointing
from mcvqa.config import Config
from mcvqa.errors import McvqaError
from mcvqa.families import unwrap
from mcvqa.scoring import allow_prefix_cache_under_checkpointing


def build_model(cfg: Config, log_fn: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """Model + processor ready to train: LoRA attached (QLoRA with nf4) or every weight trainable.

    ``model.backend: auto`` is transformers + peft; Unsloth only when asked for (and said so), never because it
    happens to be installed.
    """
    from mcvqa.model import attach_lora, load_model

    if cfg.model.quant == "fp8":
        raise McvqaError("model.quant=fp8 is for prediction; train with nf4 (QLoRA) or none, then predict with --quant fp8")
    if cfg.model.backend == "unsloth" and cfg.train.method == "lora":
        if not _unsloth_available():
            raise McvqaError("model.backend=unsloth needs a CUDA GPU and the unsloth package; use model.backend=peft")
        if log_fn is not None:
            log_fn("backend: Unsloth (model.backend=unsloth)")
        model, processor = _build_unsloth(cfg)
        families.prepare_backward(model, log_fn)
        return model, processor
    model, processor = load_model(cfg.model)
    if cfg.train.method == "lora":
        model = attach_lora(model, cfg.lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(unwrap(model), cfg.train.checkpoint_every_n_layers)
        if cfg.train.offload_checkpoints:
            from mcvqa.train.offload import offload_checkpointed_inputs

            layers = offload_checkpointed_inputs(unwrap(model))
            if log_fn is not None:
                log_fn(f"checkpointed layers keep their inputs in host memory ({layers} layers)")
        if cfg.train.method == "lora":
            # Non-reentrant checkpointing needs no grad on the inputs, but peft models expect it set up.
            unwrap(model).enable_input_require_grads()
    allow_prefix_cache_under_checkpointing(model)
    families.prepare_backward(model, log_fn)
    return model, processor


def _unsloth_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def _build_unsloth(cfg: Config) -> tuple[Any, Any]:  # pragma: no cover - needs a GPU and unsloth
    """The reference's backend: Unsloth's model (its 4-bit load, patched layers and offloaded checkpointing) and its
    LoRA with the recipe's settings; mcvqa's data, prompt, answer-only loss, validation and checkpoints on top.

    Unsloth asks to be imported before transformers so its patches apply everywhere; a command line has imported
    transformers by now, which Unsloth says in a warning. The patches the model needs are applied when it loads.
    """
    import unsloth  # noqa: F401
    from unsloth import FastVisionModel

    from mcvqa import kernels
    from mcvqa.model import load_processor, read_ahead, resolve_device, resolve_dtype, resolve_source

    name, local_only = resolve_source(cfg.model.name_or_path)
    device = resolve_device(cfg.model)
    checkpointing = "unsloth" if cfg.train.gradient_checkpointing else False
    with read_ahead(cfg.model, name, local_only):  # the command line's reader, taken over and stopped once loaded
        model, _ = FastVisionModel.from_pretrained(
            name,
            dtype=resolve_dtype(cfg.model, device),
            load_in_4bit=cfg.model.quant == "nf4",
            load_in_8bit=cfg.model.quant == "int8",
            device_map={"": str(device)},
            use_gradient_checkpointing=checkpointing,
            trust_remote_code=cfg.model.trust_remote_code,
            random_state=cfg.train.seed,
        )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=cfg.lora.vision,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        use_rslora=cfg.lora.use_rslora,
        use_gradient_checkpointing=checkpointing,
        random_state=cfg.train.seed,
    )
    FastVisionModel.for_training(model)
    if cfg.model.attn_implementation == "sdpa":
        kernels.use_causal_attention(families.for_model(model).core_and_head(model)[0])
    allow_prefix_cache_under_checkpointing(model)
    return model, load_processor(name, cfg.model.trust_remote_code, local_only)


def fp16_scaler(module: torch.nn.Module, device_type: str, autocast_dtype: torch.dtype | None) -> Any:
    """Loss scaling for fp16 training (GPUs without bf16: T4, V100): the loss is multiplied before the backward so
    small gradients do not flush to zero in fp16 activations, unscaled before clipping, and a step whose gradients
    overflowed is skipped. The trained weights must be fp32 for that (peft keeps LoRA weights in fp32 over a
    half-precision base); fp16 trainable weights would lose small updates to rounding, so they are refused."""
    fp16 = autocast_dtype == torch.float16
    if fp16:
        half = [n for n, p in module.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if half:
            raise McvqaError(
                f"fp16 training needs fp32 trainable weights, but {half[0]} (and {len(half) - 1} more) are fp16; "
                "train LoRA (train.method: lora), or load the weights in fp32 or bf16 (--set model.dtype=fp32)"
            )
    return torch.amp.GradScaler(device_type, enabled=fp16)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    return get_constant_schedule_with_warmup(optimizer, warmup)
