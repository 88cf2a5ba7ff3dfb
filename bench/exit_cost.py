"""What the interpreter's teardown costs a command: ``mcvqa predict`` entered as before ``mcvqa.cli.run`` (``main``,
then Python's own exit: every module cleared, a last collection) and as now (``run``: ``os._exit`` after the threads,
the atexit handlers and the streams), alternated in fresh processes on the same model and data:

    python bench/exit_cost.py --model DIR --data test.csv [--repeats 3] [--set model.device=cpu ...] [--out bench_out] [--json exit_cost.json]

Each row: the whole command's wall (process start to exit) and its part after the scoring (the outputs written, then
the process's end: the command's wall less its timeline's parts). GPU or CPU: whatever the model's settings pick.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from e2e import TEARDOWN_ENTRY, after_scoring, cli  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    ap.add_argument("--json", default="exit_cost.json")
    args = ap.parse_args()
    import torch

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(1, args.repeats + 1):
            for name, entry in (("teardown", TEARDOWN_ENTRY), ("run", None)):
                run = Path(tmp) / f"{name}_{repeat}"
                shutil.rmtree(run, ignore_errors=True)
                extra = [x for o in args.overrides for x in ("--set", o)]
                wall, _ = cli(["predict", "--model", args.model, "--data", args.data, "--out", str(run), "-q", *extra], entry=entry)
                summary = json.loads((run / "predict_summary.json").read_text())
                rows.append({"setting": f"entry={name}", "path": f"mcvqa predict, {summary['questions']} questions, repeat {repeat}",
                             "whole": round(wall, 2), "after_scoring": after_scoring(wall, summary)})
                print(rows[-1], flush=True)
    for name in ("teardown", "run"):
        mine = [r for r in rows if r["setting"] == f"entry={name}"]
        rows.append({"setting": f"entry={name}", "path": "median of the repeats", "whole": statistics.median(r["whole"] for r in mine),
                     "after_scoring": statistics.median(r["after_scoring"] for r in mine)})
    print(json.dumps(rows[-2:]))
    args.out.mkdir(parents=True, exist_ok=True)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    (args.out / args.json).write_text(json.dumps({"versions": versions, "date": str(date.today()), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
