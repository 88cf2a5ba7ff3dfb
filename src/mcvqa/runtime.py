"""Process-wide runtime: where this process stands among the others of a launch.

The one place that reads it: ``predict`` shards its batches with :func:`distributed`, ``train`` takes its rank and
world from it (beside the ``Accelerator`` that wraps its model: both read the same process group), and ``tune``'s
workers are placed by :func:`independent_worker`. The launcher's environment variables come from
:func:`mcvqa.config.environment`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mcvqa.config import LAUNCHER_VARIABLES, environment


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


@dataclass(frozen=True)
class Worker:
    """One of several independent processes of a launch (no process group between them)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    """Index of this process's GPU on its machine."""


def independent_worker() -> Worker:
    """This process's place under a launcher, for workers that must not form a process group (``tune``'s trials are
    different models): the launcher's variables are cleared, so nothing below this call joins a group."""
    env = environment()
    if env.world_size <= 1:
        return Worker()
    for key in LAUNCHER_VARIABLES:
        os.environ.pop(key, None)
    return Worker(env.rank, env.world_size, env.local_rank)
