"""Render BENCHMARKS.md tables from the JSON files gpu_bench.py writes.

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
        print(f"{v.get('device')} · torch {v['torch']} · transformers {v['transformers']} · peft {v['peft']} · bitsandbytes {v['bitsandbytes']} · CUDA {v.get('cuda')}\n")
        print("| setting | path | rate (q/s or samples/s) | peak GiB | other |")
        print("| --- | --- | --- | --- | --- |")
        for r in data["results"]:
            rate = r.get("q_per_s", r.get("samples_per_s"))
            other = {k: r[k] for k in r if k not in ("setting", "path", "q_per_s", "samples_per_s", "peak_gib", "prefix_tokens", "suffix_tokens", "image_tokens")}
            print(f"| {r.get('setting', '')} | {r['path']} | {fmt(rate) if rate is not None else ''} | {fmt(r.get('peak_gib', ''))} | {', '.join(f'{k}={fmt(x)}' for k, x in other.items())} |")


if __name__ == "__main__":
    main(sys.argv[1:])
