"""Where ``mcvqa predict``'s first batch spends its ~2.4 s (issue 26: the whole nf4 command's last seconds).

    python bench/first_batch.py --out "$OUT" [--quant none|nf4] [--batches 4]

The real command (``mcvqa.cli.main``, in this process, on ``bench/e2e.py``'s model and 1,000 questions), with three
views of its first ``--batches`` batches and nothing changed in how they run:

* host marks (seconds since the engine's pass began): each batch handed over by the DataLoader, each
  ``Scorer.logprobs`` call's start and return;
* CUDA events around each ``logprobs`` call: the GPU's own time for it, so how much of the first batch is the GPU
  working and how much the host getting ready (kernels loaded, Triton launchers built, the loader's workers started);
* ``cProfile`` of the host over the same window (``first_batch_<quant>_host.txt``: the 50 slowest functions by
  cumulative and by own time), naming what the host waited on.

Writes ``first_batch_<quant>.json`` and ``first_batch_<quant>_host.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from e2e import add_build_arguments, make_data  # noqa: E402
from gpu_bench import log, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(ap)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--batches", type=int, default=4, help="batches observed from the first")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import mcvqa.engine as engine
    from mcvqa.cli import main as cli
    from mcvqa.scoring import Scorer

    if not (args.build / "config.json").exists():
        from random_8b import build_random_8b

        build_random_8b(args.build, like=args.like)
    make_data(args.data, 3887, 480)
    run = Path(f"/tmp/first_batch_{args.quant}")
    shutil.rmtree(run, ignore_errors=True)

    cuda = torch.cuda.is_available()
    marks: dict[str, list[float]] = {"loader_yield": [], "logprobs_start": [], "logprobs_return": []}
    events: list[tuple[Any, Any]] = []
    origin: list[float] = []
    profiler = cProfile.Profile()
    window = {"open": False}

    def now() -> float:
        return round(time.perf_counter() - origin[0], 4)

    original_map, original_iterate, original_logprobs = engine.Engine.map, engine.iterate_batches, Scorer.logprobs

    def map_(self: Any, *a: Any, **k: Any) -> Any:
        if not origin:
            origin.append(time.perf_counter())
            profiler.enable()
            window["open"] = True
        return original_map(self, *a, **k)

    def iterate(*a: Any, **k: Any) -> Any:
        loader = original_iterate(*a, **k)  # its workers start here (predict starts them while the weights load)

        def marked() -> Any:
            for batch in loader:
                if len(marks["loader_yield"]) < args.batches:
                    marks["loader_yield"].append(now())
                yield batch

        return marked()

    def logprobs(self: Any, *a: Any, **k: Any) -> Any:
        i = len(marks["logprobs_start"])
        if i >= args.batches:
            return original_logprobs(self, *a, **k)
        marks["logprobs_start"].append(now())
        pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        if pair:
            pair[0].record()
        out = original_logprobs(self, *a, **k)
        if pair:
            pair[1].record()
            events.append(pair)
        marks["logprobs_return"].append(now())
        if i == args.batches - 1 and window["open"]:
            profiler.disable()
            window["open"] = False
        return out

    engine.Engine.map, engine.iterate_batches, Scorer.logprobs = map_, iterate, logprobs
    argv = ["predict", "--model", str(args.build), "--data", str(args.data / "test_1000.csv"), "--out", str(run), "-q"]
    if args.quant != "none":
        argv += ["--quant", args.quant]
    t = time.perf_counter()
    try:
        cli(argv)
    except SystemExit as e:
        if e.code:
            raise
    wall = time.perf_counter() - t
    engine.Engine.map, engine.iterate_batches, Scorer.logprobs = original_map, original_iterate, original_logprobs
    if window["open"]:
        profiler.disable()
    if cuda:
        torch.cuda.synchronize()
    gpu_ms = [round(a.elapsed_time(b), 2) for a, b in events]
    summary = json.loads((run / "predict_summary.json").read_text())
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write("== by cumulative time ==\n")
    stats.sort_stats("cumulative").print_stats(50)
    text.write("\n== by own time ==\n")
    stats.sort_stats("tottime").print_stats(50)
    (args.out / f"first_batch_{args.quant}_host.txt").write_text(text.getvalue())
    row = {"versions": versions(), "date": time.strftime("%Y-%m-%d"), "quant": args.quant, "wall_s": round(wall, 1),
           "marks_s": marks, "gpu_ms_per_logprobs": gpu_ms, "timeline": summary.get("timeline"),
           "batch_size": summary.get("batch_size")}
    (args.out / f"first_batch_{args.quant}.json").write_text(json.dumps(row, indent=2))
    log(row)


if __name__ == "__main__":
    main()
