"""Process-wide runtime: where this process stands among the others of a launch.

Read once, used by every command: ``predict`` shards its batches with it, ``train`` and ``tune`` learn their rank
from it. The launcher's environment variables come from :func:`mcvqa.config.environment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mcvqa.config import environment


@dataclass
class Dist:
    """This process's place under ``accelerate launch`` / ``torchrun`` (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def distributed() -> Dist:
    """Initialise the process group when launched with several processes (gloo on CPU, NCCL on GPUs)."""
    if environment().world_size <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Dist(state.process_index, state.num_processes)
