"""The training forward as one module: the answer letter's cross-entropy at the answer position, the shared prefix
packed, cached or repeated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mcvqa import families
from mcvqa.features import Batch
from mcvqa.runtime import to_device
from mcvqa.scoring import answer_hidden, compute_prefix, packed_answer_hidden


PACKED_MAX_IMAGE_TOKENS = 1024
"""Above this many tokens per image, ``train.shared_prefix: auto`` runs the cached prefix instead of packing rows."""


def resolve_shared_prefix(setting: str, quant: str, cpu: bool, family_packs: bool, image_tokens: int) -> str:
    """``train.shared_prefix``, with ``auto`` resolved.

    Measured (BENCHMARKS.md, "Training step", "Model families" and "Speed II"): packing wins with 4-bit weights (one
    dequantisation per layer pass), the cached prefix with bf16 weights and on CPU. Packed rows are attended row by
    row: over the dense mask, attention was a third of the step's GPU time. A family that cannot pack, or whose images
    are so long (LLaVA-OneVision's AnyRes: thousands of tokens a question) that packing costs more than it saves,
    takes the cached prefix."""
    if setting != "auto":
        return setting
    fits = family_packs and image_tokens <= PACKED_MAX_IMAGE_TOKENS
    return "rows" if quant != "none" and not cpu and fits else "cache"


class AnswerLoss(torch.nn.Module):
    """The training forward as one module, so DDP/FSDP wrap it and see every parameter it uses.

    ``shared_prefix``: ``packed`` (prefix + rows in one pass, see ``scoring.packed_answer_hidden``), ``rows`` (the
    same, attended row by row: :class:`mcvqa.kernels.PackedRows`), ``cache`` (prefix pass, then rows reading its keys/values) or ``off`` (batch rows carry the prefix).
    """

    def __init__(self, model: Any, prefix_ids: Sequence[int], target_ids: Sequence[int], shared_prefix: str = "packed") -> None:
        super().__init__()
        if shared_prefix not in ("packed", "rows", "cache", "off"):
            raise ValueError(f"shared_prefix must be packed, rows, cache or off, got {shared_prefix!r}")
        self.model = model
        self.prefix_ids = list(prefix_ids)
        # On the model's device: DDP broadcasts every buffer at wrap time, and NCCL has no CPU backend.
        device = model.get_input_embeddings().weight.device
        self.register_buffer("target_ids", torch.tensor(list(target_ids), dtype=torch.long, device=device), persistent=False)
        self.shared_prefix = shared_prefix
        self.family = families.for_model(model)  # once: the forward runs every step

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, (B, V) logits at the answer position)."""
        family = self.family
        _, head = family.core_and_head(self.model)
        device = batch.input_ids.device
        if batch.prefix_len or self.shared_prefix == "off":
            hidden = answer_hidden(self.model, batch, None, family)
        elif self.shared_prefix in ("packed", "rows"):
            hidden = packed_answer_hidden(self.model, batch, self.prefix_ids, family, by_rows=self.shared_prefix == "rows")
        else:
            hidden = answer_hidden(self.model, batch, compute_prefix(self.model, self.prefix_ids, device, family), family)
        logits = family.head_logits(head, hidden).float()
        assert batch.labels is not None
        loss = F.cross_entropy(logits, to_device(self.target_ids, device)[to_device(batch.labels, device)])
        return loss, logits
