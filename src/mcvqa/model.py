"""Loading vision-language checkpoints (any family: :mod:`mcvqa.families`) and adapters. The only module that calls transformers/peft loaders.

Safety: weights load from safetensors only (``use_safetensors=True``; pickle ``.bin`` checkpoints and
adapters are refused), ``trust_remote_code`` stays off unless the config enables it explicitly.
"""

from __future__ import annotations

import contextlib
import time
import importlib.util
import json
import logging
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mcvqa import families, fp8, kernels
from mcvqa.compat import require_family
from mcvqa.config import LoraConfig, ModelConfig, environment
from mcvqa.errors import ModelError
from mcvqa.families import Family, core_and_head
from mcvqa.io import INDEX, ReadAhead, index_shards, weight_files

log = logging.getLogger(__name__)


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun / accelerate launch every process owns the GPU of its local rank.
        return torch.device(f"cuda:{environment().local_rank}")
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
    has_safetensors = any(path.glob("*.safetensors")) or (path / INDEX).exists()
    if not has_safetensors:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")] + [p.name for p in path.glob("*.pth")]
        if pickled:
            raise ModelError(f"{path}: only pickle weights ({pickled[0]}); mcvqa loads safetensors only - convert the checkpoint first")
        raise ModelError(f"{path}: no *.safetensors weights found")


def check_files(folder: Path) -> None:
    """Every JSON file parses and every safetensors file is whole, checked in seconds before minutes of loading.

    An interrupted copy or upload leaves a file cut short; the loaders then fail deep inside with messages like
    "incomplete metadata" or "EOF while parsing". Here the file is named with what to do.
    """
    for f in sorted(folder.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{f}: damaged ({str(e).splitlines()[0]}); re-copy it from where it came from") from None
    for shard in index_shards(folder) or []:
        if not (folder / shard).exists():
            raise ModelError(f"{folder / shard}: missing (listed in {INDEX}); re-copy the checkpoint")
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file that is cut short or is not one: header length, header JSON, data extent."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        why = None
        if n <= 0 or 8 + n > size:
            why = f"{size} bytes, too short for its header"
        else:
            try:
                header = json.loads(fh.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end > size:
                    why = f"cut short: {size:,} bytes of {8 + n + end:,}"
            except (ValueError, KeyError, TypeError, IndexError):
                why = "its header is not valid"
    if why:
        raise ModelError(f"{path}: damaged safetensors file ({why}); re-copy it (an interrupted copy or upload leaves such files)")


def _check_remote_code(cfg: ModelConfig, path: Path | None) -> None:
    if cfg.trust_remote_code:
        warnings.warn("model.trust_remote_code is on: Python code inside the checkpoint will run", stacklevel=3)
        return
    if path is None:
        return
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path / 'config.json'}: damaged ({str(e).splitlines()[0]}); re-copy it from where it came from") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelError(
            f"{path}: the checkpoint ships its own model code (auto_map in config.json); "
            "mcvqa does not run it unless you set model.trust_remote_code=true"
        )
    if any(path.glob("*.py")):
        log.warning("%s ships Python files; they are ignored (trust_remote_code is off)", path)


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype, family: Family) -> Any | None:
    if cfg.quant in ("none", "fp8"):  # fp8 converts after loading (mcvqa.fp8), bitsandbytes has no part in it
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quant={cfg.quant} needs bitsandbytes: pip install 'mcvqa[gpu]'")
    # On CPUs with AVX512-BF16, bitsandbytes warns at import that an optional package ("kernels") is missing,
    # on every run; its plain CPU path works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers import BitsAndBytesConfig

    skip = list(family.skip_quant)
    if cfg.quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # Keep the vision tower and the head in full precision: small, and quantising them costs accuracy.
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds.

    Checked once before a Hub id is loaded: without it, an offline machine spends minutes in
    huggingface_hub's retries (2 min 33 s measured) before failing with a traceback.
    """
    from urllib.parse import urlparse

    endpoint = urlparse(environment().hub_endpoint)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, local_files_only) for a local folder or a Hub id.

    A local folder is checked here (config.json, safetensors). A Hub id is loaded from the network when the
    Hub answers, else from the local Hugging Face cache; if it is in neither, one line says so at once.
    """
    local = Path(name_or_path).expanduser()
    if local.exists() or name_or_path.startswith((".", "/", "~")):
        _check_local_checkpoint(local)
        return str(local), True
    offline = environment().hub_offline
    if not offline and hub_reachable():
        return name_or_path, False
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path, True  # cached earlier: use it without asking the network
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
    raise ModelError(
        f"{name_or_path}: no such local folder, {why}, and it is not in the local Hugging Face cache; "
        "pass a model folder with --model (or MCVQA_MODEL), or download it where there is a network"
    )


def _checkpoint_folder(name: str, local_only: bool) -> Path | None:
    """The folder ``from_pretrained(name)`` will read weights from, where it is known before loading: a local folder, or
    a Hub id's cached snapshot when nothing is to be downloaded; None when the loader may download."""
    if Path(name).is_dir():
        return Path(name)
    if not local_only:
        return None
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def read_ahead(cfg: ModelConfig, name: str, local_only: bool) -> ReadAhead:
    """:class:`mcvqa.io.ReadAhead` of the checkpoint's weight files (none when ``model.read_ahead`` is off or the files
    are not known yet), within half of the memory free now; the one a command line started early, if it reads the
    same files (:func:`mcvqa.io.read_ahead_early`)."""
    folder = _checkpoint_folder(name, local_only) if cfg.read_ahead else None
    return ReadAhead.for_files(weight_files(folder) if folder is not None else [])


def load_processor(name_or_path: str, trust_remote_code: bool = False, local_files_only: bool = False) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    except Exception as e:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{name_or_path}: cannot load the tokenizer and processor ({first}); if a file there is damaged, re-copy it") from None


def load_model(
    cfg: ModelConfig, adapter: str | Path | None = None, laps: dict[str, float] | None = None,
    on_processor: Callable[[Any, Family, torch.dtype], None] | None = None,
) -> tuple[Any, Any]:
    """(model, processor) on the configured device, in eval mode; with a LoRA adapter when given.

    ``laps``, when given, receives the seconds each part took (checks, processor, weights, adapter, kernels).
    ``on_processor(processor, family, dtype)``, when given, runs once the processor is loaded and before the weights
    are (``predict`` starts its loader's workers there, so the first batches are ready when the model is).
    """
    from transformers import AutoModelForImageTextToText

    laps = {} if laps is None else laps
    mark = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        laps[name] = round(now - mark[0], 3)
        mark[0] = now

    if adapter is not None:
        check_adapter_folder(adapter)  # before minutes of loading: is it an adapter at all?
    name, local_only = resolve_source(cfg.name_or_path)
    is_local = Path(name).is_dir()
    _check_remote_code(cfg, Path(name) if is_local else None)
    if is_local:
        check_files(Path(name))
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    hf_config = _read_config(name, cfg, local_only)
    family = families.for_config(hf_config)
    require_family(getattr(hf_config, "model_type", None))
    if not family.first_class:
        log.warning("%s: no fast path for this model family; %s", name, family.describe())
    pre = prequantised(hf_config)
    quant_kwargs: dict[str, Any] = {}
    if pre is not None:
        _say_prequantised(name, cfg, pre)
    else:
        quant_kwargs["quantization_config"] = quantization_config(cfg, dtype, family)
    if cfg.quant == "fp8" and not fp8.fp8_supported(device):
        raise ModelError("model.quant=fp8 needs a GPU with FP8 matrix units (compute capability 8.9+: L4, L40, H100, H200); use none or nf4")
    if cfg.quant in ("nf4", "int8") and device.type != "cuda" and not _said["cpu_quant"]:
        # bitsandbytes can quantise on CPU, but it is only sensible for tests; say so (once a process) rather than crawl.
        log.warning("%s weights on CPU are very slow (bitsandbytes' CPU path); meant for GPUs", cfg.quant)
        _said["cpu_quant"] = True
    lap("checks")
    # The processor first: a broken tokenizer stops the command before minutes of loading weights. Loading it in a
    # thread beside the weights was tried and the whole load measured slower (BENCHMARKS.md, "Speed II"); both
    # parts are mostly Python (transformers' imports, the loading loop), so they gain little from a second thread.
    # The disk is another matter: the weight files are read ahead while the processor's imports run.
    with read_ahead(cfg, name, local_only):
        processor = load_processor(name, cfg.trust_remote_code, local_only)
        lap("processor")
        if device.type == "cuda" and cfg.kernels != "off" and family.rms_norm_offset is not None and importlib.util.find_spec("liger_kernel"):
            kernels.warm_triton_key()  # Liger's first kernel would compute it with the GPU waiting
        if on_processor is not None:
            on_processor(processor, family, dtype)
            lap("on_processor")
        try:
            # A checkpoint saved already quantised carries its own quantization_config: passing one (even None)
            # would override it and load the packed 4-bit tensors into full-size layers.
            model = AutoModelForImageTextToText.from_pretrained(
                name,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                device_map={"": str(device)},
                use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code,
                local_files_only=local_only,
                **quant_kwargs,
            )
        except OSError as e:
            raise ModelError(f"{name}: cannot load the model ({str(e).splitlines()[0]})") from None
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise ModelError(f"{name}: needs custom code; set model.trust_remote_code=true only if you trust it") from None
            raise
    if pre is not None:
        settle_dtypes(model, dtype)
    model.eval()
    lap("weights")
    if cfg.attn_implementation == "sdpa" and family.first_class:
        kernels.use_causal_attention(core_and_head(model)[0])  # same results, fused kernels with a cached prefix
    if adapter is not None:
        model = load_adapter(model, adapter)
        lap("adapter")
    if cfg.quant == "fp8":
        if adapter is not None:
            model = model.merge_and_unload()  # the adapter folded into the bf16 weights, then both go to FP8 together
        to_fp8(model, family)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fuse_kernels(model, cfg, family)
    lap("kernels")
    return model, processor


FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The language model's projections that ``model.quant=fp8`` converts (plus the family's extra LoRA targets)."""


def to_fp8(model: Any, family: Family) -> int:
    """``model.quant=fp8``: the language model's projections (:data:`FP8_LINEARS` and the family's extra LoRA targets)
    to :class:`mcvqa.fp8.Fp8Linear`; the vision tower, projector, embeddings and head keep their weights."""
    text = family.text_model(core_and_head(model)[0])
    return fp8.convert(text, FP8_LINEARS + family.extra_lora_targets)


def fuse_kernels(model: Any, cfg: ModelConfig, family: Family, ops: kernels.FusedOps | None = None) -> dict[str, int]:
    """Route the language model's RMSNorms, SwiGLU MLPs and RoPE, and a Qwen-VL vision tower's RoPE, through Liger's
    fused kernels (``model.kernels``).

    Only for families that declare their norm's form (:attr:`Family.rms_norm_offset`) and only on a CUDA device;
    ``auto`` quietly keeps transformers' own kernels when liger-kernel is not installed, ``liger`` refuses to.
    ``ops`` replaces Liger (the tests pass :data:`mcvqa.kernels.TORCH_OPS`, which runs on the CPU too).
    """
    core = core_and_head(model)[0]
    ops = _kernel_ops(cfg, family, core, ops)
    if ops is None:
        # The RoPE swaps are process-wide (see kernels.fuse): a model loaded without the fused kernels undoes an
        # earlier load's, so the last load's setting holds (a tuning study or a benchmark loads several in turn).
        kernels.unfuse_rope(family.text_model(core), getattr(core, "visual", None))
        return {}
    fused = kernels.fuse(family.text_model(core), ops, family.rms_norm_offset, rope=family.fused_rope)
    if getattr(core, "visual", None) is not None:
        fused["vision_rope"] = kernels.fuse_vision_rope(core.visual, ops)
    return fused


def _kernel_ops(cfg: ModelConfig, family: Family, core: Any, ops: kernels.FusedOps | None) -> kernels.FusedOps | None:
    """The fused ops ``model.kernels`` asks for and this model can take, or None."""
    if cfg.kernels == "off" or family.rms_norm_offset is None:
        return None
    ops = ops or kernels.liger_ops()
    if ops is None:
        if cfg.kernels == "liger":
            raise ModelError("model.kernels=liger needs liger-kernel (pip install 'mcvqa[gpu]'); or model.kernels=auto")
        return None
    if not ops.runs_on_cpu and next(core.parameters()).device.type != "cuda":
        return None
    return ops


_said = {"cpu_quant": False}
"""Warnings said once a process (a K-fold run or a tuning study loads the model many times)."""


def _read_config(name: str, cfg: ModelConfig, local_only: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelError(f"{name}: cannot read config.json ({str(e).splitlines()[0]})") from None


def prequantised(hf_config: Any) -> str | None:
    """How a checkpoint saved already quantised stores its weights: ``nf4`` / ``fp4`` / ``int8`` for bitsandbytes,
    else the ``quant_method`` its config names; None for a checkpoint of plain weights."""
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("quant_method") == "bitsandbytes":
        if q.get("load_in_4bit") or q.get("_load_in_4bit"):
            return str(q.get("bnb_4bit_quant_type") or "fp4")
        return "int8"
    return str(q.get("quant_method") or "unknown")


def _say_prequantised(name: str, cfg: ModelConfig, pre: str) -> None:
    """The checkpoint's own quantisation wins, said in one line at load (naming what was asked for instead, if
    anything); the config then records what ran (an adapter's mcvqa.yaml, the saved config.yaml)."""
    asked = cfg.quant
    if asked in ("none", pre):
        log.warning("%s: saved already quantised (%s); loaded as it is", name, pre)
    else:
        log.warning("%s: saved already quantised (%s); its own quantisation is used, not --quant %s", name, pre, asked)
    if pre in ("nf4", "int8"):
        cfg.quant = pre


UNPACK_HEADROOM = 8 << 30
"""GPU memory ``predict.unpack_4bit=auto`` leaves free after unpacking (activations of a batch, the prefix cache)."""


def _is_bnb_4bit(module: Any) -> bool:
    """A bitsandbytes 4-bit linear (not peft's LoRA wrapper of one, which shares the class name)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def unpack_4bit(model: Any, mode: str = "auto") -> int:
    """``predict.unpack_4bit``: each bitsandbytes 4-bit linear replaced by a plain linear holding its weight dequantised
    once, in the layer's compute dtype; returns how many were replaced (0 when ``mode`` or the memory says no).

    The weights are the quantised ones, exactly: the values bitsandbytes dequantises before every product. What
    changes is the kernel (cuBLAS on bf16 weights instead of a dequantise-and-multiply per call, per batch), so
    results agree up to float rounding, and the weights take bf16's memory. Prediction only: training keeps the
    4-bit base (QLoRA's memory is the point there). A LoRA adapter's wrapper keeps working around the new layer.
    Layers are replaced one at a time, so the peak is the packed model plus one unpacked layer.
    """
    if mode == "off":
        return 0
    layers = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if _is_bnb_4bit(child)]
    if not layers:
        return 0
    device = layers[0][2].weight.device
    if mode == "auto":
        if device.type != "cuda":
            return 0
        extra = sum(c.in_features * c.out_features * (c.compute_dtype or torch.bfloat16).itemsize for _, _, c in layers)
        if torch.cuda.mem_get_info(device)[0] - extra < UNPACK_HEADROOM:
            return 0
    import bitsandbytes.functional as bnbf

    for parent, name, child in layers:
        data, state = child.weight.data, child.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for AVX512 at its first CPU product: undo it
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
        dtype = child.compute_dtype or torch.bfloat16
        weight = bnbf.dequantize_4bit(data, state).to(dtype).reshape(child.out_features, child.in_features)
        plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        plain.weight = torch.nn.Parameter(weight, requires_grad=False)
        if child.bias is not None:
            plain.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
        setattr(parent, name, plain)
        del child
    return len(layers)


def merge_adapter(model: Any) -> tuple[Any, int]:
    """``predict.merge_adapter``: a peft model whose LoRA layers all wrap plain linears, each adapter's update added to
    its base weight (``W + scaling * B @ A`` summed in fp32, rounded once to the weight's dtype) and the wrappers
    removed (peft's ``unload``); returns (the model, how many layers were merged). By hand rather than peft's
    ``merge_and_unload``: after ``unpack_4bit`` the wrapper is still peft's 4-bit class, whose merge would read the
    4-bit state the plain layer no longer has and requantise. Any other model comes back as it is: one without an
    adapter, one whose adapter wraps packed 4-bit or 8-bit layers (merging would requantise them) or FP8 layers, and
    one with an adapter kind other than plain LoRA (DoRA and other variants, LoRA bias, several active adapters)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return model, 0
    wrapped = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def plain(m: Any) -> bool:
        names = [n for n in m.active_adapters if n in m.lora_A]
        return (type(m.get_base_layer()) is torch.nn.Linear and len(names) == 1 and not m.merged
                and not getattr(m, "fan_in_fan_out", False) and names[0] not in getattr(m, "lora_variant", {})
                and not getattr(m, "use_dora", {}).get(names[0], False) and m.lora_B[names[0]].bias is None)

    if not wrapped or not all(plain(m) for m in wrapped):
        return model, 0
    with torch.no_grad():
        for m in wrapped:
            name = next(n for n in m.active_adapters if n in m.lora_A)
            weight = m.get_base_layer().weight
            delta = m.lora_B[name].weight.to(device=weight.device, dtype=torch.float32) @ m.lora_A[name].weight.to(device=weight.device, dtype=torch.float32)
            weight.copy_((weight.float() + delta * m.scaling[name]).to(weight.dtype))
    with _quiet_peft():
        merged = model.unload()
    return merged, len(wrapped)


def settle_dtypes(model: Any, dtype: torch.dtype) -> None:
    """A pre-quantised checkpoint loaded in the run's dtype, as when quantising at load: transformers keeps such a
    checkpoint's unquantised weights in the dtype they were saved in, except some (a conv bias) that it casts, so a
    bf16 folder loaded in fp32 on CPU fails in its first convolution; and 4-bit layers compute in the dtype the
    folder names (float32 when saved from a CPU run: every 4-bit matrix product in fp32 on a GPU)."""
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype = dtype
        if keep_fp32 and any(k in name.split(".") for k in keep_fp32):
            continue
        for p in module.parameters(recurse=False):
            if p.dtype.is_floating_point and p.dtype != dtype:
                p.data = p.data.to(dtype)


def save_quantized(cfg: ModelConfig, out: str | Path) -> Path:
    """``mcvqa quantize``: the model quantised as ``load_model`` quantises it at load (nf4 with double quantisation,
    vision tower and head kept unquantised), saved as a checkpoint that loads as it is: weights, processor,
    tokenizer, chat template and a ``mcvqa.yaml`` with the source's image and prompt settings. Loading it skips the
    quantisation of every run; written to ``out.tmp`` and renamed, so a failed run leaves nothing under ``out``."""
    import shutil

    import yaml

    from mcvqa.config import inherited_settings
    from mcvqa.io import replace_dir

    if cfg.quant not in ("nf4", "int8"):
        raise ModelError(f"mcvqa quantize saves nf4 or int8 checkpoints, not {cfg.quant!r} (fp8 converts at load: --quant fp8)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: already exists; pass a new folder to --out")
    if cfg.quant == "none":
        raise ModelError("mcvqa quantize needs --quant nf4 or --quant int8")
    name, local_only = resolve_source(cfg.name_or_path)
    pre = prequantised(_read_config(name, cfg, local_only))
    if pre is not None:
        raise ModelError(f"{name} is saved already quantised ({pre}); it loads as it is, nothing to do")
    model, processor = load_model(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        if Path(name).is_dir():  # files the processor does not write back (a separate chat_template.json, ...)
            for f in Path(name).iterdir():
                weights_index = f.name.endswith(".safetensors.index.json")  # the source's shards, not these
                if f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model") and not weights_index and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        settings = inherited_settings(name if Path(name).is_dir() else None)
        settings = {k: v for k, v in settings.items() if k != "model" and v}  # config.json says how it is quantised
        (tmp / "mcvqa.yaml").write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        from mcvqa.io import disk_error, disk_problem

        if isinstance(e, Exception) and disk_problem(e):
            raise disk_error(e, out) from None
        raise
    if out.exists():
        out.rmdir()
    return replace_dir(tmp, out)


def check_adapter_folder(adapter: str | Path) -> None:
    """Refuse what is not a LoRA adapter folder in one line, before any model is loaded."""
    path = Path(adapter)
    if not path.is_dir():
        raise ModelError(f"{path}: adapter folder not found")
    if not (path / "adapter_config.json").exists():
        if (path / "config.json").exists() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            raise ModelError(f"{path}: this is a full model (train.method: full), not a LoRA adapter; pass it as --model {path}")
        raise ModelError(f"{path}: no adapter_config.json; pass the folder written by `mcvqa train` (e.g. runs/t1/best)")
    if not (path / "adapter_model.safetensors").exists():
        if (path / "adapter_model.bin").exists():
            raise ModelError(f"{path}: adapter is a pickle (adapter_model.bin); mcvqa loads safetensors only")
        raise ModelError(f"{path}: no adapter_model.safetensors")
    check_files(path)


def load_adapter(model: Any, adapter: str | Path, trainable: bool = False) -> Any:
    from peft import PeftModel

    path = Path(adapter)
    check_adapter_folder(path)
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    kernels.fuse_lora(peft_model)  # as attach_lora does (lora.fused); where prediction keeps the adapter apart (TENT, blend)
    if not trainable:
        peft_model.eval()
    return peft_model


def adapter_wraps(adapter: str | Path) -> Callable[[str], bool]:
    """Whether the adapter in this folder, once loaded, wraps the module of a given name: its own config's targets
    and exclusions as peft matches them (said before the model exists; see ``Family.pixel_dtype_for``)."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = PeftConfig.from_pretrained(str(adapter))
    return lambda name: bool(check_target_module_exists(config, name))


def lora_targets(cfg: LoraConfig, family: Family) -> list[str]:
    text = list(cfg.target_modules) + [t for t in family.extra_lora_targets if t not in cfg.target_modules]
    return text + (list(family.vision_lora_targets) if cfg.vision else [])


def attach_lora(model: Any, cfg: LoraConfig) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (peft). Base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # No prepare_model_for_kbit_training: it upcasts every frozen non-quantised weight (embeddings, head,
    # norms: gigabytes for an 8B model) to fp32, which bf16 training does not need. get_peft_model freezes the base.
    family = families.for_model(model)
    targets = lora_targets(cfg, family)
    if cfg.vision and family.vision_lora_targets:
        target: Any = targets
    else:
        # Regex on the language model only: vision towers reuse q_proj-like names (Gemma 4, InternViT, SigLIP).
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
    with _quiet_peft():
        model = get_peft_model(model, peft_cfg)
    if cfg.fused:
        kernels.fuse_lora(model)
    return model


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on every wrap)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
