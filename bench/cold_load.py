"""The model's load from a cold disk, with the weights read ahead (``model.read_ahead``, the default) and without:
each run a fresh process, from its start to the model in memory, after the checkpoint's files were dropped from the
operating system's page cache (``posix_fadvise(DONTNEED)``: Linux, files this user can read):

    python bench/cold_load.py --model DIR [--device cpu|cuda] [--dtype fp32] [--repeats 3] [--out bench_out] [--json cold_load.json]
    python bench/cold_load.py --build /tmp/mid8b --layers 6     # Qwen3-VL-8B's real config cut to 6 text layers (5.6 GB bf16)

A file already cached gains nothing from the read-ahead, so this is the case it exists for: the first command after a
machine starts, or a checkpoint on a network or dataset mount. On the CPU the loader reads a bf16 checkpoint whole
only when it converts it (``--dtype fp32``, the CPU's default); on a GPU every byte is copied to the card.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

CHILD = """
import json, sys, time
from mcvqa.runtime import seconds_since_process_start
from mcvqa.config import ModelConfig
from mcvqa.model import load_model
laps = {"process_start_to_load": seconds_since_process_start()}
t = time.perf_counter()
load_model(ModelConfig(name_or_path=sys.argv[1], device=sys.argv[2], dtype=sys.argv[3], read_ahead=sys.argv[4] == "on"), laps=laps)
laps["load"] = round(time.perf_counter() - t, 3)
laps["whole"] = seconds_since_process_start()
print("LAPS " + json.dumps(laps))
"""


def drop_file(path: Path) -> bool:
    """The file's pages out of the page cache (clean pages only, hence the sync first); False where the system has no
    such call or refuses it (macOS, some FUSE mounts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def drop_from_cache(folder: Path) -> bool:
    """Every file of the folder out of the page cache; False if any could not be dropped."""
    return all([drop_file(f) for f in folder.iterdir() if f.is_file()])


def drop_works(where: Path, size: int = 512 << 20) -> dict[str, float]:
    """Whether dropping a file from the page cache makes its next read slower here (a sandbox may ignore the advice,
    and then every "cold" row below is warm): a scratch file read warm, then after the drop."""
    scratch = where / ".cold_load_probe"
    scratch.write_bytes(os.urandom(1 << 20) * (size >> 20))

    def read() -> float:
        t = time.perf_counter()
        with open(scratch, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
        return time.perf_counter() - t

    try:
        read()
        warm = read()
        drop_file(scratch)
        cold = read()
    finally:
        scratch.unlink()
    return {"warm_read_gb_s": round(size / warm / 1e9, 2), "cold_read_gb_s": round(size / cold / 1e9, 2), "drop_works": cold > 2 * warm}


def one_load(model: Path, device: str, dtype: str, read_ahead: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(model), device, dtype, read_ahead], capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("LAPS ")), None)
    if line is None:
        raise SystemExit(f"the load failed:\n{run.stderr[-3000:]}")
    return json.loads(line[5:])


def build(out: Path, layers: int, like: Path) -> None:
    """Qwen3-VL-8B-Instruct's config with ``layers`` text layers, random bf16 weights, the real processor files."""
    import shutil

    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    from mcvqa.io import share_files
    from mcvqa.tiny.like import LIKE_FILES

    config = AutoConfig.from_pretrained(like, local_files_only=True)
    config.text_config.num_hidden_layers = layers
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen3VLForConditionalGeneration(config)
    model.save_pretrained(out, max_shard_size="2GB")
    for name in LIKE_FILES:
        if (like / name).is_file() and not (out / name).exists():
            shutil.copyfile(like / name, out / name)
    share_files(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--build", type=Path, help="build the cut-down 8B here first (then measure it)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--like", type=Path, default=HERE.parent.parent / "shared" / "fixtures" / "qwen3-vl-8b-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--json", default="cold_load.json")
    args = ap.parse_args()
    model = args.model or args.build
    if model is None:
        raise SystemExit("--model DIR or --build DIR")
    if args.build is not None and not (args.build / "config.json").exists():
        build(args.build, args.layers, args.like)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    results = [{"setting": "data", "path": str(model), "weights_gb": round(size / 1e9, 2), **drop_works(model.parent)}]
    print(results[0], flush=True)
    # Where the cache cannot be dropped every load below is warm, and the rows say so.
    cache = "a cold page cache" if results[0]["drop_works"] else "a WARM page cache (this machine ignored the drop)"
    for r in range(args.repeats):
        for mode in ("off", "on"):  # alternated, so a drift of the machine falls on both
            dropped = drop_from_cache(model)
            laps = one_load(model, args.device, args.dtype, mode)
            row = {"setting": f"read_ahead={mode}", "path": f"load_model from {cache} ({args.device}, {args.dtype}), repeat {r + 1}", "dropped": dropped, **laps}
            print(row, flush=True)
            results.append(row)
    for mode in ("off", "on"):
        wholes = [row["whole"] for row in results if row.get("setting") == f"read_ahead={mode}"]
        results.append({"setting": f"read_ahead={mode}", "path": "median of the repeats", "whole": round(statistics.median(wholes), 3)})
    import platform

    import torch
    import transformers

    doc = {"versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                        "device": args.device, "cpus": os.cpu_count()},
           "date": date.today().isoformat(), "command": " ".join(sys.argv), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.json).write_text(json.dumps(doc, indent=1))
    print(json.dumps(results[-2:]))


if __name__ == "__main__":
    main()
