"""Activation checkpointing that keeps each checkpointed layer's input in host memory (``train.offload_checkpoints``).

With checkpointing, what a step holds on the GPU between its forward and its backward is each decoder layer's input
hidden states (everything inside a layer is recomputed). Those inputs grow with the rows of a pass (a fused
optimiser step packs 16 questions), and they are what Unsloth's "unsloth" checkpointing moves to the host. Here the
same thing is done through torch's own non-reentrant checkpoint, so nothing else changes: the recomputation, the
RNG state (LoRA dropout draws the same masks), autocast, and gradients that reach tensors the layer reads from
outside (the cached prefix's keys and values in ``shared_prefix: cache``).

How: torch's checkpoint saves a layer's inputs through ``ctx.save_for_backward`` outside its own saved-tensor hooks,
so hooks set around the checkpoint call see exactly those inputs and nothing inside the layer. The hooks copy each
input to page-locked host memory on a side stream (the host does not wait, and the compute stream goes on) and copy
it back on the compute stream when the backward pass recomputes the layer, after the side stream's copy has ended.
torch's ``save_on_cpu`` does the same with a blocking copy, which would make the host wait for the GPU at every
layer of every forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from mcvqa.runtime import to_device


class _HostCopy:
    """One saved input, in host memory: the copy, where it came from, and (on a GPU) when the copy ends."""

    __slots__ = ("device", "done", "host", "requires_grad")

    def __init__(self, tensor: torch.Tensor, streams: dict[torch.device, Any]):
        self.device = tensor.device
        self.requires_grad = tensor.requires_grad
        if tensor.device.type != "cuda":
            # Same semantics everywhere (the saved input is a copy, the original can be freed); the point is the GPU.
            self.host, self.done = tensor.detach().to("cpu", copy=True), None
            return
        side = streams.get(tensor.device)
        if side is None:
            side = streams[tensor.device] = torch.cuda.Stream(tensor.device)
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is written before it is copied
        with torch.cuda.stream(side):
            self.host.copy_(tensor.detach(), non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(side)
        tensor.record_stream(side)  # its memory is not reused before the copy has read it

    def restore(self) -> torch.Tensor:
        if self.done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done)  # on the GPU's queue: the host goes on
        return to_device(self.host, self.device)


def _pack(streams: dict[torch.device, Any], tensor: torch.Tensor) -> Any:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor  # masks, ids, the checkpoint's own empty marker: small, kept as they are
    return _HostCopy(tensor, streams)


def _unpack(saved: Any) -> torch.Tensor:
    return saved.restore() if isinstance(saved, _HostCopy) else saved


def offloaded_checkpoint(function: Callable[..., Any], *args: Any, streams: dict[torch.device, Any] | None = None, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)`` with the inputs it saves for the
    backward pass held in host memory instead of on the device."""
    streams = {} if streams is None else streams
    with torch.autograd.graph.saved_tensors_hooks(partial(_pack, streams), _unpack):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def offload_checkpointed_inputs(model: Any) -> int:
    """Make every layer that transformers checkpoints keep its input on the host; returns how many layers.

    Called after checkpointing is enabled (``compat.enable_checkpointing``), so ``every_n_layers`` is respected: a
    layer transformers does not checkpoint keeps its activations on the device as before."""
    streams: dict[torch.device, Any] = {}  # one side stream per device, shared by the layers
    n = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = partial(offloaded_checkpoint, streams=streams)
            n += 1
    return n
