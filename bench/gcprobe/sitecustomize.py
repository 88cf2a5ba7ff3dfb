"""Python's garbage collections in a bench's ``mcvqa`` process (``bench/stack.py`` puts this folder on PYTHONPATH).

Python imports ``sitecustomize`` at start-up. With ``MCVQA_BENCH_GC_OUT`` set, every collection is timed and, at exit,
the counts and seconds per generation (and each full collection's time from process start) go to that JSON file.
With ``MCVQA_BENCH_GC=nofreeze``, ``gc.freeze`` and ``gc.unfreeze`` do nothing: the same command without
``mcvqa.runtime.frozen_heap``, for the row beside it.
"""

import atexit
import gc
import json
import os
import time

if os.environ.get("MCVQA_BENCH_GC") == "nofreeze":
    gc.freeze = lambda: None
    gc.unfreeze = lambda: None

_out = os.environ.get("MCVQA_BENCH_GC_OUT")
if _out:
    _t0 = time.perf_counter()
    _stats = {g: {"count": 0, "seconds": 0.0, "max": 0.0} for g in range(3)}
    _full: list[list[float]] = []
    _start = [0.0]

    def _timed(phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            _start[0] = now
            return
        d, s = now - _start[0], _stats[info["generation"]]
        s["count"] += 1
        s["seconds"] += d
        s["max"] = max(s["max"], d)
        if info["generation"] == 2:
            _full.append([round(_start[0] - _t0, 2), round(d, 4)])

    gc.callbacks.append(_timed)

    def _write() -> None:
        with open(_out, "w") as f:
            json.dump({"per_generation": {str(g): {k: round(v, 4) for k, v in s.items()} for g, s in _stats.items()},
                       "full_at_s_and_seconds": _full, "frozen_at_exit": gc.get_freeze_count()}, f)

    atexit.register(_write)
