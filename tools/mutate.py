"""Mutation check: make each plausible bug of docs/mutations.json by hand, run the tests that should catch it,
restore the file. Every row must come out "red". Usage: .venv/bin/python tools/mutate.py [mutations.json [results.json]]"""
import subprocess, sys, time, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
M = json.load(open(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "mutations.json"))
rows = []
for m in M:
    f = ROOT / m["file"]; orig = f.read_text()
    assert orig.count(m["old"]) >= 1, (m["name"], "pattern not found")
    f.write_text(orig.replace(m["old"], m["new"], 1))
    t0 = time.time()
    try:
        r = subprocess.run([str(ROOT/".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m["tests"]], cwd=ROOT, capture_output=True, text=True, timeout=900)
        out = r.stdout.strip().splitlines()
        failed = [l for l in out if l.startswith("FAILED") or l.startswith("ERROR")]
        res = "red" if r.returncode != 0 else "GREEN (not caught)"
        rows.append((m["name"], res, failed[0] if failed else out[-1], round(time.time()-t0)))
    finally:
        f.write_text(orig)
    print(rows[-1], flush=True)
if len(sys.argv) > 2:
    json.dump(rows, open(sys.argv[2], "w"), indent=1, ensure_ascii=False)
sys.exit(0 if all(r[1] == "red" for r in rows) else 1)
