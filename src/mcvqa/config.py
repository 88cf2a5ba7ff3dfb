"""Typed, documented configuration.

Precedence, lowest first: dataclass defaults < a YAML recipe (``--config``) < ``--set section.field=value``
overrides < explicit CLI flags. Nothing else is read implicitly except the environment variables named
in the field docs (``MCVQA_DATA``, ``MCVQA_MODEL``). The resolved config is written next to every output.

Every environment variable mcvqa reads is read by :func:`environment`, here, and nowhere else.

Each field carries a one-line docstring (the string literal under it); ``describe()`` extracts them so
``mcvqa config --show`` and the YAML recipes document the same text.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcvqa.errors import ConfigError

LETTERS = ("a", "b", "c", "d")


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen3-VL-8B-Instruct"
    """Local folder or Hub id of a checkpoint (safetensors only; saved already quantised is fine). Env: MCVQA_MODEL."""
    quant: str = "none"
    """Weight quantisation: none | nf4 (bitsandbytes 4-bit, double quant) | int8 | fp8 (prediction only: row-wise FP8 language-model linears, Ada/Hopper GPUs; changes the numbers, BENCHMARKS.md). nf4/int8 need the gpu extra."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on GPUs that support it, else fp16; fp32 on CPU) | bf16 | fp16 | fp32."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa | eager | flash_attention_2 | flex_attention."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu) | cpu | cuda | cuda:N."""
    trust_remote_code: bool = False
    """Allow Python code shipped inside a checkpoint to run. Off, and refused unless set explicitly."""
    backend: str = "auto"
    """Training backend: auto = peft (transformers + peft) | peft | unsloth (only when asked for; needs a GPU and the unsloth package)."""
    kernels: str = "auto"
    """Fused RMSNorm / SwiGLU / RoPE in the language model (and the 2-D RoPE of a Qwen-VL vision tower): auto (Liger's Triton kernels on a CUDA GPU when liger-kernel is installed) | liger (required) | off (transformers' own)."""
    read_ahead: bool = True
    """Read the checkpoint's weight files in a background thread while the libraries import and the processor loads (at most half the free memory), so a cold disk is read while Python works; false leaves all reading to the loader."""

    def __post_init__(self) -> None:
        _choice("model.quant", self.quant, ("none", "nf4", "int8", "fp8"))
        _choice("model.kernels", self.kernels, ("auto", "liger", "off"))
        _choice("model.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        _choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2", "flex_attention"))
        _choice("model.backend", self.backend, ("auto", "peft", "unsloth"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"model.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class DataConfig:
    root: str | None = None
    """Data root: image paths in a CSV must stay inside it. Default: the CSV's own folder. Env: MCVQA_DATA."""
    val_fraction: float = 0.2
    """Fraction of the labelled rows held out for validation (stratified by answer letter)."""
    split_seed: int = 42
    """Seed of the train/validation split and of the K-fold assignment."""
    check_images: str = "header"
    """How hard to check images when a CSV is read: exists | header (open and read size; catches fakes and bombs) | full (decode)."""
    max_option_chars: int = 512
    """Options longer than this are truncated (with a warning naming the row): keeps one bad row from blowing the batch."""
    max_question_chars: int = 1024
    """Questions longer than this are truncated (with a warning naming the row)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        _choice("data.check_images", self.check_images, ("exists", "header", "full"))
        _positive("data.max_option_chars", self.max_option_chars)
        _positive("data.max_question_chars", self.max_question_chars)


@dataclass
class ImageConfig:
    mode: str = "letterbox"
    """letterbox: pad to a size x size square keeping aspect ratio (the reference); native: keep the shape within a pixel budget."""
    size: int = 512
    """Side of the letterboxed square in pixels; rounded to a multiple of 32 (patch 16 x merge 2). 512 -> 256 visual tokens."""
    max_pixels: int = 720 * 540
    """native mode: largest area kept (720x540 -> ~380 visual tokens). Larger images are scaled down."""
    min_pixels: int = 32 * 32
    """native mode: smallest area; tiny images are scaled up to it."""
    fill: tuple[int, int, int] = (0, 0, 0)
    """RGB colour of the letterbox padding."""
    max_image_pixels: int = 64_000_000
    """Refuse images with more pixels than this before decoding them (decompression-bomb guard)."""

    def __post_init__(self) -> None:
        _choice("image.mode", self.mode, ("letterbox", "native"))
        if self.size < 32:
            raise ConfigError(f"image.size must be at least 32, got {self.size}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError("image.min_pixels must not exceed image.max_pixels")
        self.fill = tuple(int(c) for c in self.fill)  # YAML gives a list
        if len(self.fill) != 3 or not all(0 <= c <= 255 for c in self.fill):
            raise ConfigError(f"image.fill must be three integers 0-255, got {self.fill}")


@dataclass
class PromptConfig:
    name: str = "fewshot_ko"
    """Built-in prompt (fewshot_ko, plain_ko, plain_en) or a path to a prompt YAML (see src/mcvqa/prompt_files/)."""


@dataclass
class LoraConfig:
    r: int = 32
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (with rsLoRA the scale is alpha / sqrt(r))."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    use_rslora: bool = True
    """Rank-stabilised LoRA scaling."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers to adapt. These names exist only in the language model: the vision tower uses qkv/proj/linear_fc*."""
    vision: bool = False
    """Also adapt the vision tower (qkv, proj, linear_fc1, linear_fc2). Did not help in published solutions."""
    fused: bool = True
    """Add each LoRA update inside the base product's epilogue (one torch.addmm, as Unsloth does) instead of peft's
    clone, multiply and add over the layer's output: the same sum, one rounding instead of three. false: peft's own
    forward (for training; an adapter loaded for prediction is always fused)."""

    def __post_init__(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")


@dataclass
class TrainConfig:
    method: str = "lora"
    """lora (QLoRA when model.quant=nf4) | full (all parameters; for small models)."""
    epochs: float = 5
    """Passes over the training split."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    batch_size: int = 8
    """Questions per device per micro-batch."""
    grad_accum: int = 2
    """Micro-batches per optimiser step."""
    fuse_accumulation: str = "auto"
    """Run the micro-batches of one optimiser step as one forward/backward (same rows, same mean loss, same step;
    one pass instead of grad_accum): auto (on GPUs with 24 GiB or more) | on | off. Memory grows to that of
    batch_size x grad_accum rows; the optimiser steps, the data order and resuming are unchanged."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms and biases)."""
    warmup_ratio: float = 0.05
    """Linear warmup as a fraction of the total optimiser steps."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine | linear | constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory."""
    checkpoint_every_n_layers: int = 1
    """With gradient checkpointing, checkpoint only every N-th decoder layer (N>1 trades spare memory for speed)."""
    offload_checkpoints: bool = False
    """With gradient checkpointing, keep each checkpointed layer's input in page-locked host memory until the backward
    pass recomputes the layer (what Unsloth's offloaded checkpointing does): less GPU memory, the same steps and
    adapter, some PCIe traffic each step. The Unsloth backend offloads by itself."""
    group_by_length: bool = True
    """Batch questions of similar token length together to cut padding (shuffled between groups)."""
    option_shuffle: bool = False
    """Augmentation: permute the content of options a-d per example and remap the label."""
    shared_prefix: str = "auto"
    """Run the shared system prompt once per batch, not once per row (exact): packed (prefix and rows in one
    pass over a dense (T, T) mask; fastest with 4-bit weights) | rows (packed, its attention as the prefix's plus
    each row's after it: the same scores, about B*S*(P+S) of them computed instead of T^2, on the fused kernels;
    families that pack with one mask tensor (Qwen-VL, InternVL) under sdpa, others run packed as usual) | cache
    (prefix pass, rows read its keys/values; fastest in bf16 and on CPU) | off | auto (rows for quantised models
    on GPU, else cache)."""
    seed: int = 42
    """Seed for weights of new layers, data order, dropout and augmentation."""
    eval_every: str = "epoch"
    """When to evaluate on the validation split: epoch | never."""
    save_total_limit: int = 1
    """Resumable checkpoints kept besides best/ (the newest ones)."""
    checkpoint_every_steps: int = 0
    """Also write a resumable checkpoint every N optimiser steps (0: only at epoch ends)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers: any of tensorboard, wandb (offline when no API key); [] for none."""
    kfold: int = 0
    """K-fold mode: train k models on k stratified folds and report mean +- std (0: single split)."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0: run all epochs); the schedule is fitted to the shorter run.
    For smoke tests and benchmarks."""
    stop_after_steps: int = 0
    """End this invocation after this many optimiser steps (counted from where it started or resumed) with a
    resumable checkpoint, keeping the full run's schedule (0: run to the end). Splits a long run over sessions
    with a time limit: each ``mcvqa train --resume`` runs that many more, and the last ends with the same adapter
    as an uninterrupted run."""
    log_every: int = 10
    """Log the running loss every N optimiser steps."""
    num_workers: int = -1
    """DataLoader workers preparing images and tokens in parallel with the model (0: in the main process;
    -1: auto, as predict.num_workers: up to 8 on a GPU, none on CPU)."""

    def __post_init__(self) -> None:
        if self.num_workers < -1:
            raise ConfigError(f"train.num_workers must be -1 (auto), 0 or more, got {self.num_workers}")
        _choice("train.method", self.method, ("lora", "full"))
        _choice("train.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        _choice("train.eval_every", self.eval_every, ("epoch", "never"))
        _choice("train.shared_prefix", self.shared_prefix, ("auto", "packed", "rows", "cache", "off"))
        _choice("train.fuse_accumulation", self.fuse_accumulation, ("auto", "on", "off"))
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.checkpoint_every_n_layers", self.checkpoint_every_n_layers)
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ConfigError("train.offload_checkpoints keeps checkpointed layers' inputs on the host: it needs train.gradient_checkpointing=true; "
                              "or set train.offload_checkpoints=false (configs/seed.yaml turns it on)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps < 0 or self.stop_after_steps < 0:
            raise ConfigError("train.max_steps and train.stop_after_steps must be 0 (off) or more")
        if self.kfold == 1 or self.kfold < 0:
            raise ConfigError(f"train.kfold must be 0 (off) or at least 2, got {self.kfold}")
        for r in self.report_to:
            _choice("train.report_to", r, ("tensorboard", "wandb"))


COMPILE_SCOPES = ("off", "vision", "mlp", "layers")
"""``predict.compile`` values (see :func:`mcvqa.kernels.compile_blocks`)."""


@dataclass
class PredictConfig:
    batch_size: int = 16
    """Questions per forward pass."""
    scoring: str = "logits"
    """logits: softmax over the a/b/c/d token logits at the answer position | generate: the reference's generate-and-parse."""
    prefix_cache: bool = True
    """Reuse the system prompt's key/value cache for every batch (exact; the prompt is ~80% of each sequence)."""
    prefix_rows: bool = True
    """Keep that cache laid out once per row of a batch, so each layer writes only a batch's own keys and values after
    it instead of concatenating the whole prompt again (exact; about 2 GiB for Qwen3-VL-8B at batch 16, taken only
    where the device keeps a tenth of its memory and 2 GiB free after it, given back if a batch runs out of memory; not
    with compile=layers) | false: concatenate in every layer."""
    sort_by_length: bool = True
    """Batch questions of similar token length together (less padding); outputs stay in the CSV's order."""
    num_workers: int = -1
    """DataLoader workers decoding images in parallel with the model (0: in the main process; -1: auto = up to 8 on a GPU, 0 on CPU)."""
    early_loader: bool = True
    """Start those workers once the tokenizer and processor are loaded, so the first batches are ready when the weights
    are (plain scoring, and the orders pass of --tta orders; the batches are used only if the loaded model needs
    exactly them) | false: after the load."""
    on_bad_image: str = "fail"
    """What to do with a test row whose image cannot be read: fail (stop with a message naming the row) | skip (answer from the text with a blank grey image; listed in bad_images.csv)."""
    max_new_tokens: int = 8
    """generate scoring only: tokens to generate before parsing the letter."""
    compile: str = "off"
    """torch.compile the repeated blocks: off | vision (the vision tower's norms and MLPs) | mlp (norms and MLPs) | layers (whole decoder layers; vision norms and MLPs). GPU; first batches compile."""
    merge_adapter: str = "auto"
    """A LoRA adapter (``--adapter``) folded into the base weights once after loading, so each layer runs one matrix
    product instead of the base's plus the adapter's two (peft's merge: the same sum, the merged weights rounded to
    the compute dtype). auto (default: where the base weights are plain: bf16, fp32, or 4-bit unpacked by
    predict.unpack_4bit; packed 4-bit weights are never requantised, and test-time methods that train the adapter
    or switch it off, tent, sar, tpt and blend, keep it apart) | off."""
    unpack_4bit: str = "auto"
    """4-bit (nf4/fp4) weights dequantised once after loading instead of in every matrix product: the same weights (the values bitsandbytes dequantises before each product), plain bf16 matrix products, the memory of bf16 weights. auto (default: on a GPU with room for them and 8 GiB to spare; a smaller GPU keeps them packed, and so do test-time methods that take gradients: tent, sar, tpt) | on | off (always packed). Prediction only: training keeps 4-bit weights."""

    def __post_init__(self) -> None:
        _positive("predict.batch_size", self.batch_size)
        _choice("predict.compile", self.compile, COMPILE_SCOPES)
        _choice("predict.unpack_4bit", self.unpack_4bit, ("auto", "on", "off"))
        _choice("predict.merge_adapter", self.merge_adapter, ("auto", "off"))
        if self.num_workers < -1:
            raise ConfigError(f"predict.num_workers must be -1 (auto), 0 or more, got {self.num_workers}")
        _choice("predict.scoring", self.scoring, ("logits", "generate"))
        _choice("predict.on_bad_image", self.on_bad_image, ("fail", "skip"))


ADAPTIVE = ("tent", "sar", "tpt", "zero")
"""Test-time methods that run alone (they adapt weights or prompts, or vote over their own views)."""

GRADIENT_TTA = {"tent", "sar", "tpt"}
"""Test-time methods whose steps backpropagate through the model (``zero`` only votes)."""

ADAPTER_TTA = GRADIENT_TTA | {"blend"}
"""Test-time methods that need a LoRA adapter kept apart from the base weights: they train it, or switch it off."""

BEST_TTA = ["orders", "views"]
"""``--tta best``: the methods the evaluation in the README supports."""


@dataclass
class TTAConfig:
    methods: list[str] = field(default_factory=list)
    """Test-time methods for predict, composable in this order: orders | pride, views, blend; or one of tent, sar, tpt, zero alone. best = orders + views (the README's table). [] = plain scoring."""
    orders: int = 4
    """Cyclic option orders scored by orders/pride (4: every option visits every letter)."""
    pride_fraction: float = 0.05
    """pride: fraction of the test questions scored under all orders to estimate the letter prior."""
    pride_min: int = 32
    """pride: but never fewer than this many questions (or all of them): a prior from a handful is noise."""
    views: list[str] = field(default_factory=lambda: ["rescale", "crop", "colour", "jpeg"])
    """views: mild, text-safe image changes averaged with the original (rescale, crop, colour, jpeg; never flips)."""
    blend_fraction: float = 0.1
    """blend: the least confident fraction of questions rescored with the adapter disabled."""
    blend_weight: float = 0.5
    """blend: weight of the base model's log-probabilities on those questions."""
    params: str = "lora"
    """tent/sar: which weights adapt: lora (needs --adapter) | norm (the language model's RMSNorm weights)."""
    lr: float = 1e-4
    """tent/sar learning rate."""
    steps: int = 1
    """tent/sar: gradient steps per batch."""
    episodic: bool = False
    """tent/sar: reset the weights after every batch."""
    optimizer: str = "adam"
    """tent/sar optimiser: adam | sgd (momentum 0.9)."""
    sar_e0: float = 0.4
    """sar: adapt only on samples with entropy below e0 x ln 4."""
    sar_rho: float = 0.05
    """sar: radius of the sharpness-aware step."""
    sar_reset_below: float = 0.2
    """sar: reset the weights when the moving average of the loss falls below this."""
    consistency: float = 0.0
    """sar: weight of the term that makes the prediction on an augmented view agree with the original's."""
    tpt_tokens: int = 4
    """tpt: learnable soft-prompt tokens."""
    tpt_lr: float = 5e-3
    """tpt: learning rate of the single step per question."""
    select: float = 0.3
    """tpt/zero: fraction of the most confident views kept."""

    def __post_init__(self) -> None:
        if "best" in self.methods:
            # What the README's evaluation table supports: best or tied-best accuracy wherever the model reads
            # the options, and the largest fix for a letter-biased model (its GPU cost: BENCHMARKS.md, test-time methods).
            self.methods = list(dict.fromkeys(m for name in self.methods for m in (BEST_TTA if name == "best" else [name])))
        for m in self.methods:
            _choice("tta.methods", m, ("orders", "pride", "views", "blend", "tent", "sar", "tpt", "zero"))
        # Combinations are checked here, before any model loads (one line, exit 2), not mid-run.
        adaptive = [m for m in self.methods if m in ADAPTIVE]
        if adaptive and len(self.methods) > 1:
            raise ConfigError(f"--tta {','.join(self.methods)}: {adaptive[0]} adapts on its own and cannot be combined; use it alone")
        if "pride" in self.methods and "orders" in self.methods:
            raise ConfigError("--tta pride,orders: pride already averages its estimation questions over the orders; choose orders or pride")
        for v in self.views:
            _choice("tta.views", v, ("rescale", "crop", "colour", "jpeg"))
        _choice("tta.params", self.params, ("lora", "norm"))
        _choice("tta.optimizer", self.optimizer, ("adam", "sgd"))
        if not 2 <= self.orders <= 4:
            raise ConfigError(f"tta.orders must be 2, 3 or 4, got {self.orders}")
        for name in ("pride_fraction", "blend_fraction", "select"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"tta.{name} must be in (0, 1], got {getattr(self, name)}")
        _positive("tta.steps", self.steps)
        _positive("tta.pride_min", self.pride_min)
        _positive("tta.tpt_tokens", self.tpt_tokens)


@dataclass
class Config:
    """Everything a run needs; one YAML recipe maps onto it section by section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image"]["fill"] = list(d["image"]["fill"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def dump(self, path: str | Path) -> None:
        from mcvqa.io import atomic_write_text

        atomic_write_text(path, self.to_yaml())


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "image": ImageConfig,
    "prompt": PromptConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "predict": PredictConfig,
    "tta": TTAConfig,
}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/CLI value to the annotated field type, or fail naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        elem = args[0] if args else Any
        out = [_coerce(name, v, elem) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if value is None:
            raise ConfigError(f"{name} must be a string, got null")
        if isinstance(value, bool):
            # YAML 1.1 reads `off`/`on` (and no/yes) as booleans: `compile: off` means the word, not False.
            return "on" if value else "off"
        return str(value)
    return value


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field {section}.{unknown[0]}; known: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["lora.r=16", "train.lr=2e-4"]`` -> ``{"lora": {"r": 16}, "train": {"lr": 2e-4}}`` (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set lora.r=16")
        key, raw = item.split("=", 1)
        if "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set lora.r=16")
        section, name = key.strip().split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[name.strip()] = value
    return out


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        merged.setdefault(section, {}).update(values)
    return merged


INHERITED = {"image": None, "prompt": None, "model": ("name_or_path", "quant", "dtype")}
"""What a model or adapter folder's ``mcvqa.yaml`` passes on: how it was trained to see and be asked."""


def inherited_settings(folder: str | Path | None) -> dict[str, dict[str, Any]]:
    """Image/prompt settings (and, for an adapter, its base model) saved as ``mcvqa.yaml`` beside weights."""
    if folder is None:
        return {}
    p = Path(folder) / "mcvqa.yaml"
    if not p.is_file():
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for section, keep in INHERITED.items():
        values = data.get(section) or {}
        if isinstance(values, dict):
            out[section] = {k: v for k, v in values.items() if keep is None or k in keep}
    return out


# ------------------------------------------------------------------------------------------ environment

LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")
"""What ``torchrun`` / ``accelerate launch`` set for each process (``tune`` clears them for independent trials)."""


@dataclass(frozen=True)
class Environment:
    """The environment variables mcvqa reads, read at the moment of the call (tests and launchers set them)."""

    data: str | None
    """``MCVQA_DATA``: the data root when the config sets none; also where a relative CSV path is looked up."""
    model: str | None
    """``MCVQA_MODEL``: ``model.name_or_path`` when the config sets none."""
    world_size: int
    """``WORLD_SIZE``: processes in this launch (``accelerate launch`` / ``torchrun``); 1 otherwise."""
    rank: int
    """``RANK``: this process among all of the launch."""
    local_rank: int
    """``LOCAL_RANK``: this process's GPU on its host."""
    local_world_size: int
    """``LOCAL_WORLD_SIZE``: processes on this host (the CPU cores are shared among them)."""
    hub_offline: bool
    """``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set: never try the Hugging Face Hub."""
    hub_endpoint: str
    """``HF_ENDPOINT``: the Hub's address (a mirror), else huggingface.co."""
    wandb_configured: bool
    """``WANDB_API_KEY`` or ``WANDB_MODE`` set; without either, Weights & Biases logs offline."""
    wandb_project: str
    """``WANDB_PROJECT``, default ``mcvqa``."""


def environment() -> Environment:
    get = os.environ.get

    def flag(name: str) -> bool:
        return get(name, "").strip().lower() in ("1", "true", "yes", "on")

    return Environment(
        data=get("MCVQA_DATA") or None,
        model=get("MCVQA_MODEL") or None,
        world_size=int(get("WORLD_SIZE", "1")),
        rank=int(get("RANK", "0")),
        local_rank=int(get("LOCAL_RANK", "0")),
        local_world_size=max(1, int(get("LOCAL_WORLD_SIZE", "1"))),
        hub_offline=flag("HF_HUB_OFFLINE") or flag("TRANSFORMERS_OFFLINE"),
        hub_endpoint=get("HF_ENDPOINT") or "https://huggingface.co",
        wandb_configured=bool(get("WANDB_API_KEY") or get("WANDB_MODE")),
        wandb_project=get("WANDB_PROJECT") or "mcvqa",
    )


RECIPES = Path(__file__).resolve().parent / "recipes"
"""The recipes shipped in the package (``configs/`` in the repository points here)."""


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file: the path as given, else the shipped recipe of that name (``demo``, ``seed.yaml``, or
    ``configs/demo.yaml`` typed outside the repository)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    if (RECIPES / name).is_file() and (len(p.parts) == 1 or p.parent.name == "configs"):
        return RECIPES / name
    shipped = ", ".join(sorted(x.stem for x in RECIPES.glob("*.yaml")))
    raise ConfigError(f"{p}: config file not found (shipped recipes: {shipped})")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, dict[str, Any]] | None = None,
    env: bool = True,
    inherit: list[str | Path | None] | None = None,
) -> Config:
    """Defaults < settings inherited from model/adapter folders < YAML at ``path`` < overrides.

    Unknown sections or fields are errors, not silently ignored.
    """
    raw: dict[str, dict[str, Any]] = {}
    for folder in inherit or []:
        raw = _merge(raw, inherited_settings(folder))
    if path is not None:
        p = resolve_recipe(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model:, train:, ...)")
        for section, values in loaded.items():
            if section not in SECTIONS:
                raise ConfigError(f"{p}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise ConfigError(f"{p}: section {section!r} must be a mapping")
            raw = _merge(raw, {section: values})
    if env:
        e = environment()
        if e.model and "name_or_path" not in raw.get("model", {}):
            raw.setdefault("model", {})["name_or_path"] = e.model
        if e.data and "root" not in raw.get("data", {}):
            raw.setdefault("data", {})["root"] = e.data
    if overrides:
        ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        raw = _merge(raw, ov)
    sections = {name: _build_section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(**sections)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), litgpt-style."""
    src = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def describe(cfg: Config) -> str:
    """The resolved config as commented YAML: every field with its value and its one-line doc."""
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, tuple):
                value = list(value)
            dumped = yaml.safe_dump({f.name: value}, allow_unicode=True, default_flow_style=True).strip()
            dumped = dumped[1:-1] if dumped.startswith("{") else dumped
            lines.append(f"  # {docs.get(f.name, '')}")
            lines.append(f"  {dumped}")
    return "\n".join(lines) + "\n"
