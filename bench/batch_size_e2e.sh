#!/usr/bin/env bash
# predict's batch size through the CLI, same call, same 1,000 competition-like questions (issue 26):
#   bash bench/batch_size_e2e.sh  (after the wheel install in BENCHMARKS.md; writes $OUT/batch_size.json)
set -euo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
python3 - <<'PY'
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "bench"); sys.path.insert(0, "src")
from e2e import make_data
from gpu_bench import versions
from random_8b import build_random_8b
build, data, out = Path("/tmp/q8b_real"), Path("/tmp/e2e_data"), Path(os.environ.get("OUT", "bench_out"))
if not (build / "config.json").exists():
    build_random_8b(build, like=Path(".fixtures/qwen3-vl-8b-instruct"))
make_data(data, 1000, 16)
rows = []
for bs in (16, 64, 16, 64):
    run = Path(f"/tmp/bs_{bs}_{len(rows)}")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mcvqa", "predict", "--model", str(build), "--data", str(data / "test.csv"), "--out", str(run), "-q", "--batch-size", str(bs)], check=True)
    wall = time.perf_counter() - t
    s = json.loads((run / "predict_summary.json").read_text())
    rows.append({"batch_size": bs, "wall_s": round(wall, 1), "load_s": s.get("load_seconds"), "questions": s["questions"],
                 "q_per_s_after_load": round(s["questions"] / (wall - (s.get("load_seconds") or 0)), 1)})
    print(rows[-1], flush=True)
    (out / "batch_size.json").write_text(json.dumps({"versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
PY
