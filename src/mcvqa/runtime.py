"""Process-wide runtime: where this process stands among the others of a launch, and how its tensors reach its GPU.

The one place that reads it: ``predict`` shards its batches with :func:`distributed`, ``train`` takes its rank and
world from it (beside the ``Accelerator`` that wraps its model: both read the same process group), and ``tune``'s
workers are placed by :func:`independent_worker`. The launcher's environment variables come from
:func:`mcvqa.config.environment`.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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


# ------------------------------------------------------------------------------------------ progress


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar that counts the work, fitted to where stderr goes: a redrawn bar on a terminal; in a log file or a
    pipe (a job scheduler, ``nohup``, CI), one plain line every ``mininterval`` seconds (30 by default) and one at the
    end, with no carriage returns or escape codes to flood the log."""
    import sys

    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(**kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("mininterval", 30.0)
    return _LogLines(**kwargs)


def _log_lines_class() -> Any:
    from tqdm import tqdm

    class LogLines(tqdm):  # type: ignore[misc, valid-type]
        """tqdm writing whole lines: its status printer redraws with ``\\r``, which a log keeps as one endless line."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(ascii=True, ncols=100, dynamic_ncols=False, leave=True)
            self._last, self._last_t, self._final = "", float("-inf"), False
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            import time

            now = time.monotonic()
            # At most one line per mininterval (set_postfix refreshes at every step), the last one always.
            if not self._final and now - self._last_t < self.mininterval:
                return True
            line = (msg if msg is not None else self.__str__()).strip()
            if line and line != self._last:  # the same state twice (a refresh at close) is not worth a line
                self.fp.write(line + "\n")
                self.fp.flush()
                self._last, self._last_t = line, now
            return True

        def close(self) -> None:
            if self.disable:
                return
            if not self._final:
                self._final = True
                self.display()
            self.disable = True  # tqdm's own close would add a blank line
            with self.get_lock():
                try:
                    self._instances.remove(self)
                except KeyError:
                    pass

    return LogLines


def _LogLines(**kwargs: Any) -> Any:
    global _LOG_LINES
    if _LOG_LINES is None:
        _LOG_LINES = _log_lines_class()
    return _LOG_LINES(**kwargs)


_LOG_LINES: Any = None


def seconds_since_process_start() -> float | None:
    """Seconds since this process was started (Linux ``/proc``; None elsewhere): a command's timeline begins when the
    user pressed enter, before Python and torch were imported, not when ``main`` ran."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``, queued behind the GPU's work rather than waiting for it.

    A copy from pageable host memory to a GPU first waits for everything already queued on the stream (CUDA stages
    it through a buffer of its own), so a batch's copies and positions would make the host wait for the previous
    batch to finish before it can queue this one. From page-locked memory the copy is queued like a kernel: a CPU
    tensor bound for a GPU is pinned first (the DataLoader's batches arrive pinned: :meth:`mcvqa.features.Batch.pin_memory`).
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)  # no copy a host thread would have to wait for: a GPU-to-host copy stays blocking
    if not t.is_contiguous():
        # page-locking copies into a tensor of the same strides: an expanded view (positions broadcast over a batch)
        # would be written through one element many times, which torch refuses; and a strided view of a pinned
        # tensor (a batch's half, after an out-of-memory split) would be copied through a pageable buffer
        t = t.contiguous()
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


_FROZEN = 0


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave out of Python's garbage collection every object alive on entry, until the block ends.

    A loaded model, the libraries it imported and their caches are hundreds of thousands of objects that live for the
    whole command. Python's full collections walk all of them, holding the host for hundreds of milliseconds while
    the GPU drains its queue and idles (seen in a training step's profile: BENCHMARKS.md). Objects made inside the
    block are collected as usual. On exit the frozen objects are handed back to the collector, even when the block
    raises (``mcvqa tune`` prunes a trial from inside training), so a process that trains or predicts many times
    frees a finished model's reference cycles (:func:`collect_garbage`, before the next model loads).
    Re-entrant: only the outermost block freezes and unfreezes. Python has one frozen set, so the outermost exit also
    hands back what anything else froze before it; freezing only decides which objects a collection walks, never
    which are freed while referenced, so that costs such a freeze its speed, not its correctness.
    """
    global _FROZEN
    if _FROZEN == 0:
        gc.collect()  # garbage already made (the load's temporaries) is freed now, not kept frozen for the block
        gc.freeze()
    _FROZEN += 1
    try:
        yield
    finally:
        _FROZEN -= 1
        if _FROZEN == 0:
            gc.unfreeze()


def collect_garbage() -> None:
    """Free what earlier work left in reference cycles (a finished trial's or fold's model, held by its modules' own
    references) before another model loads, and give the GPU memory it held back to the device: otherwise two models
    can share the card until Python's collector next runs a full pass."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
