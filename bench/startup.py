"""Where the predict command's first seconds go on this machine (issue 26: the processor's 4.7 s on the GPU machine
against ~0.5 s on the CPU machine). One fresh process, each step timed, then the processor's load profiled:

    python bench/startup.py --out "$OUT" [--json startup.json]

Steps, in the order ``mcvqa predict`` meets them: ``import torch``, CUDA's context, ``import transformers``,
``import torchvision`` (which imports torch._dynamo), the modeling module, then ``AutoProcessor.from_pretrained``
(cProfile's top functions by cumulative time, so the next session knows what to cut).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def torchvision_importtime(top: int = 30) -> list[tuple[str, float]]:
    """``import torchvision`` after torch and transformers, in a fresh process under ``-X importtime``: the modules
    with the largest cumulative import time (seconds), so the slow part of the 5-6 s measured on the GPU machine is
    named (1.5 s on the CPU machine, 1.1 s of it torch._dynamo)."""
    import subprocess

    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch, transformers; import torchvision"],
                         capture_output=True, text=True, check=False)
    rows = []
    for line in run.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((parts[2].rstrip(), int(parts[1]) / 1e6))
    # Only what torchvision's import added: the lines after transformers' own import finished.
    tail = rows[next((i for i, r in enumerate(rows) if r[0].strip() == "transformers"), -1) + 1:]
    return sorted(tail, key=lambda r: -r[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", type=Path, default=HERE.parent / ".fixtures" / "qwen3-vl-8b-instruct")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--json", default="startup.json")
    args = ap.parse_args()
    laps: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        laps[name] = round(now - mark, 3)
        mark = now

    import torch

    lap("import_torch")
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    lap("cuda_context")
    import transformers

    lap("import_transformers")
    loaded = set(sys.modules)
    import torchvision  # noqa: F401

    lap("import_torchvision")
    pulled = sorted(m for m in set(sys.modules) - loaded if m.count(".") == 0)
    from transformers.models.qwen3_vl import modeling_qwen3_vl  # noqa: F401

    lap("import_modeling")
    prof = cProfile.Profile()
    prof.enable()
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(str(args.like))
    prof.disable()
    lap("processor")
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
    args.out.mkdir(parents=True, exist_ok=True)
    row = {"laps": laps, "torchvision_pulled_in": pulled, "torchvision_importtime": torchvision_importtime(), "processor_profile": text.getvalue()[-12000:],
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}}
    (args.out / args.json).write_text(json.dumps(row, indent=1))
    print(json.dumps(laps))


if __name__ == "__main__":
    main()
