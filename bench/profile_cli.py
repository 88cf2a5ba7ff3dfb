"""Where ``mcvqa predict`` (or ``mcvqa train``) loses the GPU's time between the model alone and the CLI (issue 26).

    python bench/profile_cli.py --out "$OUT" [--quant none|nf4] [--n 1000] [--skip 20] [--active 8]
    python bench/profile_cli.py --out "$OUT" --command train --shared-prefix rows [--skip 8] [--active 4]

``--command train`` profiles ``mcvqa train --config configs/seed.yaml`` (one epoch of e2e.py's 480 rows) over
``--active`` optimiser steps instead, stepping the profiler at each ``optimizer_step``; its files are named
``cli_*_train_<shared_prefix>``.

The real command (``mcvqa.cli.main``, in this process, on ``bench/e2e.py``'s model and data) with torch.profiler
recording CPU and CUDA activity over ``--active`` batches after ``--skip`` batches (the loader warm, the first
batch's compile and the prefix done). ``Scorer.logprobs`` is wrapped only to step the profiler's schedule, so the
engine loop, the loader, the journal and the copies back run as a user's run does. Writes:

* ``cli_profile_<quant>.json``: the window's wall time (host clock, between the logprobs calls that open and close
  it), the GPU's busy time in it (the union of kernel and copy intervals on the device), so the idle share: an
  estimate, as the device runs behind the host and the profiler's own CPU cost lengthens the window;
* ``cli_profile_<quant>.txt``: torch.profiler's table, sorted by CPU total (what the host spends its time on);
* ``cli_trace_<quant>.json.gz``: the Chrome trace of the window (open in Perfetto): where the gaps are;
* ``cli_gaps_<quant>.json``: the device's idle gaps, each blamed on the host op that launched the work ending it
  and on any synchronising call made during it (``python bench/profile_cli.py --analyse TRACE`` redoes this on a
  trace already fetched).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
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


def busy_seconds(events: list[dict[str, Any]]) -> float:
    """The union of the device's kernel and memcpy/memset intervals in a Chrome trace, in seconds."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e6


def _innermost(ops: list[tuple[float, float, str]], starts: list[float], t: float, look: int = 400) -> list[str]:
    """Names of the (at most four) innermost host ops whose interval holds ``t``, outermost first; ``ops`` are one
    thread's, sorted by start. Looks back over ``look`` ops only: enough for the nesting around one launch."""
    i = bisect.bisect_right(starts, t)
    chain = [ops[j][2] for j in range(i - 1, max(i - 1 - look, -1), -1) if ops[j][1] >= t]
    return chain[:4][::-1]


def gaps(events: list[dict[str, Any]], min_us: float = 20.0, top: int = 20) -> dict[str, Any]:
    """The device's idle gaps in a torch.profiler Chrome trace, blamed on host ops.

    A gap ends when the host launches the next piece of work: the host op around that launch is what the GPU waited
    for (``waited_for``). A synchronising runtime call inside the gap (a stream or device synchronise, a blocking
    copy) means the host itself waited before it could launch (``synced_by``: the host op around that call).
    """
    device = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("correlation")) for e in events
                    if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launch = {e.get("args", {}).get("correlation"): e for e in runtime}
    # Calls that hold the host until the GPU catches up: synchronisations, and copies that block (a blocking
    # cudaMemcpy, or a cudaMemcpyAsync from pageable memory, which waits for the stream: seen as a long call).
    syncs = sorted(((e["ts"], e["ts"] + e.get("dur", 0), e) for e in runtime
                    if "Synchronize" in e["name"] or e["name"] == "cudaMemcpy"
                    or (e["name"].startswith("cudaMemcpy") and e.get("dur", 0) >= min_us)), key=lambda s: s[0])
    by_thread: dict[Any, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            by_thread.setdefault(e.get("tid"), []).append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    threads = {tid: (sorted(v), sorted(o[0] for o in v)) for tid, v in by_thread.items()}

    def around(e: dict[str, Any]) -> str:
        ops, starts = threads.get(e.get("tid"), ([], []))
        return " > ".join(_innermost(ops, starts, e["ts"])) or "(no host op)"

    syncs.sort(key=lambda s: s[1])
    sync_ends = [s[1] for s in syncs]
    waited: dict[str, float] = {}
    synced: dict[str, float] = {}
    total, count, small, end = 0.0, 0, 0.0, None
    for start, stop, corr in device:
        if end is not None and 0 < start - end < min_us:
            small += start - end  # the device's own launch-to-launch gaps, even with work queued (CUDA graphs' share)
        if end is not None and start - end >= min_us:
            idle = start - end
            total += idle
            count += 1
            at = launch.get(corr)
            key = around(at) if at is not None else "(launch not in trace)"
            waited[key] = waited.get(key, 0.0) + idle
            j = bisect.bisect_left(sync_ends, end)  # calls still running when the gap opened, by end time
            while j < len(syncs) and syncs[j][0] >= start:  # the first of them that began before the gap closed
                j += 1
            if j < len(syncs):
                k = syncs[j][2]["name"] + " in " + around(syncs[j][2])
                synced[k] = synced.get(k, 0.0) + idle
        end = stop if end is None else max(end, stop)

    def ranked(d: dict[str, float]) -> list[list[Any]]:
        return [[k, round(v / 1e3, 3)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"min_gap_us": min_us, "gaps": count, "idle_ms": round(total / 1e3, 3), "idle_in_smaller_gaps_ms": round(small / 1e3, 3),
            "kernels": len(device),
            "waited_for_ms": ranked(waited), "synced_by_ms": ranked(synced)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(ap)
    ap.add_argument("--command", choices=("predict", "train"), default="predict")
    ap.add_argument("--shared-prefix", default="auto", help="train only: train.shared_prefix (auto, packed, rows, cache)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="train only: more --set KEY=VALUE for the CLI")
    ap.add_argument("--tag", help="train only: the output files' suffix instead of train_<shared-prefix> (two backends in one call)")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--n", type=int, default=1000, help="200, 1000 or more (all 3,887); at least (skip + active) batches' worth")
    ap.add_argument("--skip", type=int, default=20, help="batches before the profiled window")
    ap.add_argument("--active", type=int, default=8, help="batches profiled")
    ap.add_argument("--stack", action="store_true", help="record Python frames too: the gaps name the Python function "
                    "around each launch and sync (the host runs slower, so the idle share grows)")
    ap.add_argument("--analyse", type=Path, help="only analyse this Chrome trace (.json or .json.gz) and print its gaps")
    args = ap.parse_args()
    if args.analyse:
        opener = gzip.open if args.analyse.suffix == ".gz" else open
        with opener(args.analyse, "rt") as f:
            print(json.dumps(gaps(json.load(f).get("traceEvents", [])), indent=2, ensure_ascii=False))
        return
    if args.skip < 2 or args.active < 1:
        ap.error("--skip must be at least 2 (the profiler warms up over two batches) and --active at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    from torch.profiler import ProfilerActivity, profile, schedule

    from mcvqa.cli import main as cli
    from mcvqa.scoring import Scorer

    if not (args.build / "config.json").exists():
        from random_8b import build_random_8b

        build_random_8b(args.build, like=args.like)
    make_data(args.data, 3887, 480)  # e2e.py's set (reused when there): test.csv and its first 200 / 1,000 rows
    csv = args.data / ("test_200.csv" if args.n <= 200 else "test_1000.csv" if args.n <= 1000 else "test.csv")
    run = Path(f"/tmp/profile_cli_{args.quant}")
    shutil.rmtree(run, ignore_errors=True)

    marks: list[float] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, with_stack=args.stack,
                   schedule=schedule(wait=max(args.skip - 2, 0), warmup=2, active=args.active, repeat=1))
    if args.command == "train":
        import mcvqa.train.loop as loop

        owner, attr, tag = loop, "optimizer_step", args.tag or f"train_{args.shared_prefix}"
        run = Path(f"/tmp/profile_cli_{tag}")
        argv = ["train", "--config", str(HERE.parent / "configs" / "seed.yaml"), "--model", str(args.build), "--data", str(args.data / "train.csv"),
                "--out", str(run), "-q", "--set", "train.epochs=1", "--set", "train.eval_every=never", "--set", "train.report_to=[]",
                "--set", "data.val_fraction=0.01", "--set", f"train.shared_prefix={args.shared_prefix}"]
        argv += [a for kv in args.sets for a in ("--set", kv)]
    else:
        owner, attr, tag = Scorer, "logprobs", args.quant
        run = Path(f"/tmp/profile_cli_{args.quant}")
        argv = ["predict", "--model", str(args.build), "--data", str(csv), "--out", str(run), "-q"]
        if args.quant != "none":
            argv += ["--quant", args.quant]
    shutil.rmtree(run, ignore_errors=True)
    original = getattr(owner, attr)

    def stepped(*a: Any, **k: Any) -> Any:
        out = original(*a, **k)
        marks.append(time.perf_counter())
        prof.step()
        return out

    setattr(owner, attr, stepped if args.command == "train" else (lambda self, *a, **k: stepped(self, *a, **k)))
    t = time.perf_counter()
    with prof:
        try:
            cli(argv)
        except SystemExit as e:
            if e.code:
                raise
    wall = time.perf_counter() - t
    setattr(owner, attr, original)
    if len(marks) < args.skip + args.active:
        raise SystemExit(f"only {len(marks)} steps ran: --skip {args.skip} + --active {args.active} needs more (--n)")
    trace = args.out / f"cli_trace_{tag}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    first = args.skip  # the window: from the step that opened it to the last active step
    window = marks[first + args.active - 1] - marks[first - 1] if len(marks) >= first + args.active else None
    busy = busy_seconds(events)
    averages = prof.key_averages()
    (args.out / f"cli_profile_{tag}.txt").write_text(averages.table(sort_by="cpu_time_total", row_limit=40))
    (args.out / f"cli_profile_{tag}_cuda.txt").write_text(averages.table(sort_by="self_cuda_time_total", row_limit=40))
    row: dict[str, Any] = {"versions": versions(), "date": time.strftime("%Y-%m-%d"), "command": args.command, "wall_s": round(wall, 1),
                           "steps_profiled": args.active, "window_s": round(window, 3) if window else None, "gpu_busy_s": round(busy, 3),
                           "gpu_idle_share": round(1 - busy / window, 3) if window else None}
    if args.command == "train":
        m = json.loads((run / "metrics.json").read_text())
        rows_per_step = 16  # seed.yaml: batch 8 x accumulation 2, one fused pass per optimiser step
        row.update({"shared_prefix": args.shared_prefix, "steady_samples_per_s": m.get("steady_samples_per_second"),
                    "samples_per_s_in_window": round(args.active * rows_per_step / window, 2) if window else None,
                    "peak_gib": m.get("peak_gpu_gib")})
    else:
        summary = json.loads((run / "predict_summary.json").read_text())
        row.update({"quant": args.quant, "questions": summary["questions"],
                    "q_per_s_in_window": round(args.active * summary["batch_size"] / window, 1) if window else None,
                    "timeline": summary.get("timeline")})
    (args.out / f"cli_profile_{tag}.json").write_text(json.dumps(row, indent=2))
    (args.out / f"cli_gaps_{tag}.json").write_text(json.dumps(gaps(events), indent=2, ensure_ascii=False))
    log(row)


if __name__ == "__main__":
    main()
