"""Activation checkpointing that keeps each checkpointed layer's input in host memory (``train.offload_checkpoints``).

With checkpointing, what a step holds on the GPU between its forward and its backward is each decoder layer's input
hidden states (everything inside a layer is recomputed). Those inputs grow with the rows of a pass (a fused
optimiser step packs 16 questions), and they are what Unsloth's "unsloth" checkpointing moves to the host. Here the
same thing is done through torch's own non-reentrant checkpoint, so nothing else changes: the recomputation, the
RNG state (LoRA dropout draws the same masks), autocast, and gradients that reach tensors the layer reads from
outside (the cached prefix's keys and values in ``shared_prefix: cache``).

How: torch's checkpoint saves a layer's positional tensor inputs through ``ctx.save_for_backward`` before its own
saved-tensor hook goes on, so hooks set around the checkpoint call see exactly those inputs and nothing inside the
layer. The hooks copy each input that needs a gradient to page-locked host memory on a side stream (neither the
host nor the compute stream waits). The backward pass recomputes the layers last to first; when it takes one
layer's input back, it starts the copy of the layer before it on the side stream, so that copy runs under this
layer's recomputation and backward instead of before the next one. torch's ``save_on_cpu`` copies with the host
waiting, at every layer of every forward, and fetches nothing ahead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from mcvqa.runtime import to_device


class Offloader:
    """The host copies of one model's checkpointed inputs, in the order the forward made them, and a side stream per
    GPU for the copies. Only weak references are kept: a copy lives as long as the graph that saved it, and one whose
    graph is gone (an earlier micro-batch's) is not fetched."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, Any] = {}
        self.last: weakref.ref[_HostCopy] | None = None

    def side_stream(self, device: torch.device) -> Any:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def keep(self, copy: _HostCopy) -> None:
        """Chain ``copy`` after the one made before it: the input the backward pass needs after ``copy``'s."""
        copy.previous, self.last = self.last, weakref.ref(copy)


class _HostCopy:
    """One saved input in host memory: the copy, where it came from, when the copy to the host ends (GPU), and the
    copy back once it has been started ahead of time."""

    __slots__ = ("__weakref__", "back", "device", "done", "host", "offloader", "previous")

    def __init__(self, tensor: torch.Tensor, offloader: Offloader):
        self.device, self.offloader = tensor.device, offloader
        self.previous: weakref.ref[_HostCopy] | None = None
        self.back: tuple[torch.Tensor, Any] | None = None
        if tensor.device.type != "cuda":
            # Same semantics everywhere (the saved input is a copy, the original can be freed); the point is the GPU.
            self.host, self.done = tensor.detach().to("cpu", copy=True), None
        else:
            side = offloader.side_stream(tensor.device)
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is written before it is copied
            with torch.cuda.stream(side):
                self.host.copy_(tensor.detach(), non_blocking=True)
                self.done = torch.cuda.Event()
                self.done.record(side)
            tensor.record_stream(side)  # its memory is not reused before the copy has read it
        offloader.keep(self)

    def fetch(self) -> None:
        """Start the copy back to the device (on the side stream on a GPU) without waiting for it."""
        if self.back is not None:
            return
        if self.done is None:
            self.back = (to_device(self.host, self.device), None)
            return
        side = self.offloader.side_stream(self.device)
        with torch.cuda.stream(side):
            side.wait_event(self.done)  # the copy to the host has ended before the copy back reads it
            tensor = self.host.to(self.device, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(side)
        self.back = (tensor, arrived)

    def restore(self) -> torch.Tensor:
        self.fetch()
        assert self.back is not None
        tensor, arrived = self.back
        self.back = None  # a second backward (retain_graph) fetches again
        if arrived is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(arrived)  # on the GPU's queue: the host goes on
            tensor.record_stream(current)  # made on the side stream, used on this one
        earlier = self.previous() if self.previous is not None else None
        if earlier is not None:
            earlier.fetch()  # the input the backward pass recomputes next comes in under this layer's work
        return tensor


def _pack(offloader: Offloader, tensor: torch.Tensor) -> Any:
    # An input that needs no gradient belongs to a checkpoint that builds no graph (a frozen vision block): it is
    # freed when the layer returns, and copying it would only cost the PCIe time. Masks, ids and torch's own empty
    # marker stay as they are too.
    if not tensor.requires_grad or not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    return _HostCopy(tensor, offloader)


def _unpack(saved: Any) -> torch.Tensor:
    return saved.restore() if isinstance(saved, _HostCopy) else saved


def offloaded_checkpoint(function: Callable[..., Any], *args: Any, offloader: Offloader | None = None, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)`` with the inputs it saves for the
    backward pass held in host memory instead of on the device."""
    offloader = Offloader() if offloader is None else offloader
    with torch.autograd.graph.saved_tensors_hooks(partial(_pack, offloader), _unpack):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def offload_checkpointed_inputs(model: Any) -> int:
    """Make every layer that transformers checkpoints keep its input on the host; returns how many layers.

    Called after checkpointing is enabled (``compat.enable_checkpointing``), so ``every_n_layers`` is respected: a
    layer transformers does not checkpoint keeps its activations on the device as before."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    offloader = Offloader()  # one per model: the layers' copies in one order, one side stream per device
    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = partial(offloaded_checkpoint, offloader=offloader)
            n += 1
    return n
