"""Data-parallel predict scaling: the same test set scored on 1 GPU and, under ``accelerate launch``, on N GPUs.

    python bench/gpu_multi.py --model /tmp/q8b --data /tmp/multi/test.csv --out $OUT/p1
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 bench/gpu_multi.py ... --out $OUT/p2

Each process loads the model and scores one batch untimed (prefix cache, CUDA kernels), then all processes
meet at a barrier and rank 0 times ``mcvqa.predict.predict`` - the production path: sharding, scoring,
gathering and writing the one submission. Scaling efficiency = (q/s on N) / (N x q/s on 1).
The random 8B is built with ``bench/random_8b.py`` and the data with ``mcvqa synth`` if missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mcvqa.config import load_config  # noqa: E402
from mcvqa.data import read_csv  # noqa: E402
from mcvqa.features import collate  # noqa: E402
from mcvqa.predict import build_scorer, predict  # noqa: E402
from mcvqa.runtime import distributed  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/q8b"))
    ap.add_argument("--data", type=Path, default=Path("/tmp/multi/test.csv"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=6, help="image-decoding DataLoader workers per process")
    args = ap.parse_args()
    cfg = load_config(None, [f"model.name_or_path={args.model}", f"model.quant={args.quant}", "image.size=512",
                             f"predict.batch_size={args.batch_size}", f"predict.num_workers={args.workers}"], env=False)
    dist = distributed()
    scorer = build_scorer(cfg)
    ds = read_csv(args.data)
    enc = scorer.encoder
    scorer.logprobs(collate([enc.encode(it) for it in ds.items[: args.batch_size]], enc.pad_id))
    sync()
    dist.barrier()
    t = time.perf_counter()
    predict(cfg, args.data, args.out, scorer=scorer, dataset=ds, progress=False)
    sync()
    dist.barrier()
    seconds = time.perf_counter() - t
    if dist.main:
        row = {"world": dist.world, "questions": len(ds), "seconds": seconds, "q_per_s": len(ds) / seconds,
               "quant": args.quant, "batch_size": args.batch_size, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        (args.out / "multi.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
