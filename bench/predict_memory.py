"""predict on big inputs: peak memory and time for N questions, as a user runs it (the real command, from process start).

A competition set grown with augmented copies (20,000-100,000 rows) should cost memory for its rows and its
probabilities only, and time linear in N. Builds a tiny model and a test CSV of N rows whose images come from a pool
of synthetic pictures (copies share files, as augmented rows often do), runs ``mcvqa predict`` as a subprocess for
each N and reads the child's peak RSS from ``getrusage``.

    python bench/predict_memory.py --out runs/predict_memory --sizes 2000,20000,100000
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/predict_memory"))
    ap.add_argument("--sizes", default="2000,20000,100000")
    ap.add_argument("--pool", type=int, default=500, help="distinct images the rows share")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mcvqa", "tiny", "--out", str(model)], check=True, capture_output=True)
    pool = out / "data"
    if not (pool / "test.csv").exists():
        subprocess.run([sys.executable, "-m", "mcvqa", "synth", "--out", str(pool), "--train", "0", "--test", str(args.pool)], check=True, capture_output=True)
    base = pd.read_csv(pool / "test.csv", dtype=str, keep_default_na=False)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        csv = pool / f"test_{n}.csv"
        big = pd.concat([base] * (n // len(base) + 1), ignore_index=True).iloc[:n].copy()
        big["id"] = [f"q{i:06d}" for i in range(n)]
        big.to_csv(csv, index=False)
        dest = out / f"pred_{n}"
        cmd = [sys.executable, "-m", "mcvqa", "predict", "--model", str(model), "--data", str(csv), "--out", str(dest),
               "--device", "cpu", "--batch-size", str(args.batch_size), "-q"]
        # A fresh wrapper per run, so the children's peak RSS it reports is this run's alone.
        wrapper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
                   "r = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True); "
                   "print(json.dumps([r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stderr[-2000:]]))")
        res = subprocess.run([sys.executable, "-c", wrapper, json.dumps(cmd)], capture_output=True, text=True, check=True)
        code, seconds, peak_kib, err = json.loads(res.stdout.strip().splitlines()[-1])
        if code != 0:
            raise SystemExit(err)
        rows.append({"questions": n, "seconds": round(seconds, 1), "q_per_s": round(n / seconds, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
                     "submission_rows": sum(1 for _ in open(dest / "submission.csv")) - 1})
        print(json.dumps(rows[-1]), flush=True)
    import torch
    import transformers

    report = {"rows": rows, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv)}
    (out / "predict_memory.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
