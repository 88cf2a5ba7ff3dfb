"""Mutation check: make each plausible bug of docs/mutations.json by hand, run the tests that should catch it,
restore the file. A mutation counts only when it is both caught and reached:

* **red**: the named tests failed with the bug in place;
* **reached**: with the bug in place, the named tests executed the mutated lines (coverage of that one file,
  measured in the same run), so the bug sits on a path the suite really takes. A bug made in a copy the product
  never calls is reported ``UNREACHED`` even if some test goes red for another reason.

A row may name ``env`` (extra environment variables, e.g. ``{"PYTHONPATH": ".venv-oldest"}`` for a bug that only
the oldest supported transformers can show) and ``select`` (a pytest ``-k`` expression).

Usage: .venv/bin/python tools/mutate.py [--only SUBSTRING] [--json results.json] [mutations.json]
Exit 1 if any row is not both red and reached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mutated_lines(text: str, new: str, at: int | None = None) -> list[int]:
    """1-based line numbers of the first occurrence of ``new`` in ``text`` (the lines a mutation wrote), blank lines
    and comments left out (coverage never marks them). A deletion (``new`` empty) is the line it was cut from
    (``at``: its offset). Each line is mapped to the first line of the statement that holds it: coverage reports a
    statement spread over several lines (a call, a dict literal) under its first line only."""
    if not new.strip():
        lines = [text.count("\n", 0, at or 0) + 1]
    else:
        start = text.index(new)
        first = text.count("\n", 0, start) + 1
        parts = new.split("\n")
        if new.endswith("\n"):
            parts = parts[:-1]
        lines = [first + i for i, line in enumerate(parts) if line.strip() and not line.strip().startswith("#")]
    return sorted({_statement_start(text, n) for n in lines})


def _statement_start(text: str, line: int) -> int:
    """The first line of the innermost statement spanning ``line`` (the line itself if the file does not parse)."""
    import ast

    try:
        tree = ast.parse(text)
    except SyntaxError:
        return line
    best = None
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and node.lineno <= line <= (node.end_lineno or node.lineno):
            if best is None or (node.lineno, -(node.end_lineno or 0)) >= (best.lineno, -(best.end_lineno or 0)):
                best = node
    if best is None:
        return line
    # A compound statement's header is its own line; inside its body the innermost statement was chosen above.
    return best.lineno


def run_one(m: dict, python: str) -> dict:
    f = ROOT / m["file"]
    orig = f.read_text()
    if orig.count(m["old"]) < 1:
        return {"name": m["name"], "result": "PATTERN NOT FOUND", "detail": m["old"][:80]}
    mutated = orig.replace(m["old"], m["new"], 1)
    f.write_text(mutated)
    lines = mutated_lines(mutated, m["new"], orig.index(m["old"]))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / ".coverage"
        env = {**os.environ, **{k: str(ROOT / v) if k == "PYTHONPATH" else v for k, v in (m.get("env") or {}).items()}}
        # Subprocesses the tests start (the CLI under subprocess, accelerate launch) are measured too.
        env["COVERAGE_PROCESS_START"] = str(Path(tmp) / "rc")
        (Path(tmp) / "rc").write_text(f"[run]\nparallel = True\ndata_file = {data}\ninclude = {f}\n")
        sitecustom = Path(tmp) / "site"
        sitecustom.mkdir()
        (sitecustom / "sitecustomize.py").write_text("import coverage\ncoverage.process_startup()\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(sitecustom), env.get("PYTHONPATH", "")) if p)
        cmd = [python, "-m", "coverage", "run", "--rcfile", str(Path(tmp) / "rc"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m["tests"]]
        if m.get("select"):
            cmd += ["-k", m["select"]]
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
        finally:
            f.write_text(orig)
        subprocess.run([python, "-m", "coverage", "combine", "--rcfile", str(Path(tmp) / "rc"), "-q"], cwd=tmp, capture_output=True, env=env)
        report = Path(tmp) / "cov.json"
        subprocess.run([python, "-m", "coverage", "json", "--rcfile", str(Path(tmp) / "rc"), "-q", "-o", str(report)], cwd=tmp, capture_output=True, env=env)
        executed: set[int] = set()
        if report.exists():
            for name, info in json.loads(report.read_text()).get("files", {}).items():
                if Path(name).resolve() == f.resolve():
                    executed |= set(info.get("executed_lines", []))
    out = r.stdout.strip().splitlines()
    failed = [line for line in out if line.startswith(("FAILED", "ERROR"))]
    red = r.returncode != 0
    reached = bool(lines) and any(n in executed for n in lines)
    result = "red" if red and reached else "UNREACHED" if not reached else "GREEN (not caught)"
    return {"name": m["name"], "file": m["file"], "lines": lines, "result": result, "reached": reached, "red": red,
            "first_failure": failed[0] if failed else (out[-1] if out else r.stderr[-300:]), "seconds": round(time.time() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mutations", nargs="?", default=str(ROOT / "docs" / "mutations.json"))
    ap.add_argument("--only", help="run the rows whose name contains this")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    python = str(ROOT / ".venv" / "bin" / "python")
    rows = []
    for m in json.loads(Path(args.mutations).read_text()):
        if args.only and args.only not in m["name"]:
            continue
        rows.append(run_one(m, python))
        print(json.dumps({k: rows[-1][k] for k in ("name", "result", "first_failure", "seconds") if k in rows[-1]}, ensure_ascii=False), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    sys.exit(0 if rows and all(r["result"] == "red" for r in rows) else 1)


if __name__ == "__main__":
    main()
