"""Render BENCHMARKS.md tables from the JSON files the bench scripts write (``results`` rows of gpu_bench/e2e,
``rows`` of levers: phase, variant, batch).

    python bench/tables.py bench/results/2026-11-25/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.1 else f"{v:.2f}"
    return str(v)


def main(paths: list[str]) -> None:
    for p in paths:
        data = json.loads(Path(p).read_text())
        print(f"\n### {Path(p).name}\n")
        v = data["versions"]
        # a CPU bench (cold_load.py) records no GPU libraries
        print(" · ".join([str(v.get("device"))] + [f"{k} {v[k]}" for k in ("torch", "transformers", "peft", "bitsandbytes", "cuda", "cpus") if k in v]) + "\n")
        print("| setting | path | rate (q/s or samples/s) | peak GiB | other |")
        print("| --- | --- | --- | --- | --- |")
        for r in data.get("results", data.get("rows", [])):
            rate = r.get("q_per_s", r.get("samples_per_s"))
            path = r.get("path") or " ".join(str(r[k]) for k in ("phase", "variant", "batch", "micro_batch", "workers") if k in r)
            skip = ("setting", "path", "phase", "variant", "batch", "micro_batch", "workers", "q_per_s", "samples_per_s", "peak_gib", "prefix_tokens",
                    "suffix_tokens", "image_tokens", "applied", "losses", "step_seconds", "gc")
            other = {k: r[k] for k in r if k not in skip}
            if r.get("step_seconds") and "median_step_seconds" not in r:  # rows written before stack.py recorded it
                other["median_step_seconds"] = median(r["step_seconds"][4:])
            if isinstance(r.get("gc"), dict):  # full collections (generation 2): how many, and their seconds in all
                full = r["gc"].get("per_generation", {}).get("2", {})
                other["full_gc"] = f"{full.get('count')} ({full.get('seconds')} s)"
            print(f"| {r.get('setting', '')} | {path} | {fmt(rate) if rate is not None else ''} | {fmt(r.get('peak_gib', ''))} | {', '.join(f'{k}={fmt(x)}' for k, x in other.items())} |")


def median(xs: list[float]) -> float | None:
    """The median of ``xs`` (None when empty), to 4 decimals: a run's typical step, which a slow stretch moves least."""
    xs = sorted(xs)
    return round((xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2, 4) if xs else None


if __name__ == "__main__":
    main(sys.argv[1:])
