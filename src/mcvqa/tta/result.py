"""What a composition of test-time methods returns, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Cost:
    forwards: float = 0.0
    """Question-level forward passes per question (a shared-prefix pass over V orders counts as V)."""
    backwards: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forwards + other.forwards, self.backwards + other.backwards)


@dataclass
class TTAResult:
    probs: np.ndarray
    """(N, 4) probabilities by original option."""
    cost: Cost = field(default_factory=Cost)
    per_order: np.ndarray | None = None
    """(N, V, 4) probabilities of each question under each option order, by original option."""
    notes: dict[str, Any] = field(default_factory=dict)
