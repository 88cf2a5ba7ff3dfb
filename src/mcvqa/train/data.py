"""Training data: options shuffled per (seed, epoch, index), batches grouped by length, a pure function of the
settings so a resumed run forms the same batches."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from mcvqa.data import Item
from mcvqa.features import Encoder, Example


class TrainDataset(torch.utils.data.Dataset):
    """Items encoded on demand, with an optional per-epoch option shuffle that is a pure function of
    (seed, epoch, index) - the same whichever worker or resumed process draws it."""

    def __init__(self, items: Sequence[Item], encoder: Encoder, shuffle_options: bool, seed: int) -> None:
        self.items = list(items)
        self.encoder = encoder
        self.shuffle_options = shuffle_options
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int) -> Item:
        it = self.items[i]
        if self.shuffle_options:
            rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
            order = list(range(4))
            rng.shuffle(order)
            it = it.permuted(order)
        return it

    def __getitem__(self, i: int) -> Example:
        return self.encoder.encode(self.item(i))


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The epoch's batches: shuffled; with grouping, sorted by length inside chunks of 64 batches and the
    batch order shuffled again, so padding shrinks while the data order stays random."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        mega = batch_size * 64
        idx = [j for s in range(0, len(idx), mega) for j in sorted(idx[s : s + mega], key=lambda j: -lengths[j])]
    batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches
