"""Where ``mcvqa predict``'s time goes on the GPU (issue 17): the data path alone, the model alone, and a
breakdown of one forward (positions, vision tower, language model, head), on the real 8B architecture.

    python bench/profile_predict.py --out "$OUT" [--quant none|nf4] [--n 800]

* data path: the engine's DataLoader (decode, letterbox, image processor, collate) with no model, q/s.
* model alone: pre-collated batches already on the GPU, ``Scorer.logprobs`` per batch, q/s, per batch size.
* breakdown: CUDA-synchronised timers around the stages of one forward (adds a few syncs; for shares, not totals).
* top CUDA kernels and CPU ops of a few batches (torch.profiler), written to ``profile_*.txt``.

Reuses ``bench/e2e.py``'s model (``--build``) and data (``--data``) when they are there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from e2e import add_build_arguments, make_data  # noqa: E402
from gpu_bench import log, sync, versions  # noqa: E402


class Timers:
    """Synchronised wall time per named stage, summed over calls."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, list[float]] = {}

    def wrap(self, module: torch.nn.Module, name: str) -> None:
        self.wrap_fn(module, "forward", name)

    def wrap_fn(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a: Any, **k: Any) -> Any:
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t
            self.calls.setdefault(name, []).append(time.perf_counter() - t)
            return out

        setattr(owner, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(ap)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--batch-sizes", default="16,32")
    ap.add_argument("--compile", default="off")
    ap.add_argument("--orders", type=int, default=0, help="also profile --tta orders at this batch size (0: skip)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    log(info)

    from mcvqa.config import load_config
    from mcvqa.data import read_csv
    from mcvqa.engine import iterate_batches
    from mcvqa.features import Collator
    from mcvqa.predict import build_scorer

    if not (args.build / "config.json").exists():
        from random_8b import build_random_8b

        build_random_8b(args.build, like=args.like)
    make_data(args.data, max(args.n, 1000), 480)
    cfg = load_config(None, [f"model.name_or_path={args.build}", f"model.quant={args.quant}", f"predict.compile={args.compile}"], env=False)
    items = read_csv(args.data / "test.csv", cfg=cfg.data).items[: args.n]
    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    scorer = build_scorer(cfg)
    rows.append({"what": "load (build_scorer)", "seconds": round(time.perf_counter() - t, 2)})
    log(rows[-1])
    enc = scorer.encoder

    # 1. the data path alone
    for workers in (0, -1):
        bs = 16
        batches = [list(range(s, min(s + bs, len(items)))) for s in range(0, len(items), bs)]
        t = time.perf_counter()
        n = 0
        for b in iterate_batches(items, enc, batches, with_prefix=False, num_workers=workers):
            n += len(b)
        dt = time.perf_counter() - t
        rows.append({"what": f"data path alone (DataLoader, num_workers={workers})", "q_per_s": round(n / dt, 1)})
        log(rows[-1])

    # 2. the model alone, pre-collated batches on the GPU
    collate = Collator(enc, with_prefix=False)
    exs = [enc.encode(it) for it in items[: min(len(items), 512)]]
    lengths = sorted(range(len(exs)), key=lambda i: len(exs[i].suffix_ids))  # like the engine's length sorting
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        gpu_batches = [collate([exs[i] for i in lengths[s : s + bs]]).to(scorer.device) for s in range(0, len(exs), bs)]
        scorer.logprobs(gpu_batches[0])  # warm-up (prefix cache, kernels)
        dt = _timed(scorer.logprobs, gpu_batches)
        rows.append({"what": f"model alone, batch {bs} (Scorer.logprobs, batches on the GPU)", "q_per_s": round(len(exs) / dt, 1),
                     "ms_per_batch": round(1000 * dt / len(gpu_batches), 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)})
        log(rows[-1])

    # 3. breakdown of the forward
    from mcvqa.families import core_and_head

    core, head = core_and_head(scorer.model)
    timers = Timers()
    timers.wrap(core.visual, "vision tower")
    timers.wrap(core.language_model, "language model")
    timers.wrap_fn(scorer.family, "positions", "positions (M-RoPE: get_rope_index)")
    bs = 16
    gpu_batches = [collate([exs[i] for i in lengths[s : s + bs]]).to(scorer.device) for s in range(0, len(exs), bs)]
    total = _timed(scorer.logprobs, gpu_batches, timers)
    row = {"what": "breakdown, batch 16 (synchronised timers)", "total_ms_per_batch": round(1000 * total / len(gpu_batches), 1)}
    row.update({k: round(1000 * v / len(gpu_batches), 1) for k, v in timers.total.items()})
    rows.append(row)
    log(row)

    if args.orders:
        profile_orders(scorer, items, args, rows, timers)

    # 4. profiler: top kernels and CPU ops over 4 batches
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in gpu_batches[:4]:
            scorer.logprobs(b)
        sync()
    tag = args.quant
    (args.out / f"profile_{tag}_cuda.txt").write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    (args.out / f"profile_{tag}_cpu.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    (args.out / f"profile_{tag}.json").write_text(json.dumps({"versions": info, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


def _timed(fn: Any, batches: list, timers: Timers | None = None) -> float:
    """Seconds for ``fn`` over every batch (synchronised), the stage timers restarted for this loop."""
    if timers is not None:
        timers.total.clear()
        timers.calls.clear()
    sync()
    t = time.perf_counter()
    for b in batches:
        fn(b)
    sync()
    return time.perf_counter() - t


def profile_orders(scorer: Any, items: list, args: argparse.Namespace, rows: list, timers: Timers) -> None:
    """``--tta orders``: all 4 cyclic orders per question against one order, same questions, same batch size;
    the vision tower and the language model timed apart."""
    from torch.profiler import ProfilerActivity, profile

    from mcvqa.tta import item_orders
    from mcvqa.features import Collator

    enc, bs = scorer.encoder, args.orders
    n = min(len(items), 256)
    sel = sorted(range(n), key=lambda i: len(enc.encode(items[i]).suffix_ids))
    oexs = [enc.encode_orders(items[i], item_orders(items[i], 4)) for i in sel]
    exs = [enc.encode(items[i]) for i in sel]
    collate = Collator(enc, with_prefix=False)
    single = [collate(exs[s : s + bs]).to(scorer.device) for s in range(0, n, bs)]
    groups = [oexs[s : s + bs] for s in range(0, n, bs)]
    scorer.logprobs(single[0])
    scorer.logprobs_orders(groups[0])
    one = _timed(scorer.logprobs, single, timers)
    four = _timed(scorer.logprobs_orders, groups, timers)
    row = {"what": f"orders, batch {bs}: 4 orders vs 1 per question", "one_order_q_per_s": round(n / one, 1), "four_orders_q_per_s": round(n / four, 1),
           "ratio": round(four / one, 2)}
    row.update({f"4 orders: {k} ms/batch": round(1000 * v / len(groups), 1) for k, v in timers.total.items()})
    rows.append(row)
    log(row)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for g in groups[:2]:
            scorer.logprobs_orders(g)
        sync()
    (args.out / f"profile_{args.quant}_orders_cuda.txt").write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
