"""accelerate launch with 2 CPU processes (gloo): sharded predict and DDP training match one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--main_process_port", str(_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mcvqa", *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def with_unreadable_images(synth_data: Path, folder: Path) -> Path:
    """The synthetic test set's first 6 rows with 3 unreadable images among them (cut in the header, empty, missing)."""
    import pandas as pd

    test = pd.read_csv(synth_data / "test.csv").iloc[:6]
    (folder / "img").mkdir(parents=True)
    for rid, path in zip(test["id"], test["path"]):
        (folder / "img" / f"{rid}.jpg").write_bytes((synth_data / path).read_bytes())
    (folder / "img" / "head.jpg").write_bytes((synth_data / test.iloc[0]["path"]).read_bytes()[:300])
    (folder / "img" / "zero.jpg").write_bytes(b"")
    test["path"] = [f"img/{rid}.jpg" for rid in test["id"]]
    bad = pd.DataFrame([{**test.iloc[0].to_dict(), "id": f"bad_{k}", "path": f"img/{k}.jpg"} for k in ("head", "zero", "gone")])
    pd.concat([test.iloc[:3], bad, test.iloc[3:]]).to_csv(folder / "t.csv", index=False)
    return folder / "t.csv"


@pytest.mark.slow
def test_sharded_predict_equals_single_process(tiny_model: Path, synth_data: Path, tmp_path: Path) -> None:
    """Two gloo processes write one process's submission, through PriDe (Engine.map under every option order on its
    sample, then plain scoring, Engine.score, elsewhere: the paths of every other method), with --on-bad-image skip:
    the unreadable images (found by the CSV reader or the decoder, on whichever process holds them) are answered from
    their text and listed once. One launch for all of it (a launch is the cost here)."""
    method = ["--on-bad-image", "skip", "--tta", "pride", "--set", "tta.pride_min=5"]
    skip = True
    data = with_unreadable_images(synth_data, tmp_path / "d")
    common = ["predict", "--model", str(tiny_model), "--data", str(data), "--device", "cpu", "-q", "--batch-size", "4", *method]
    run([sys.executable, "-m", "mcvqa", *common, "--out", str(tmp_path / "one")])
    run(launch(2, *common, "--out", str(tmp_path / "two")))
    assert (tmp_path / "two" / "submission.csv").read_bytes() == (tmp_path / "one" / "submission.csv").read_bytes()
    assert (tmp_path / "two" / "probs.csv").read_bytes() == (tmp_path / "one" / "probs.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").glob("journal.rank*.done")) == ["journal.rank0-of-2.jsonl.done", "journal.rank1-of-2.jsonl.done"]
    if skip:
        listed = lambda d: sorted((tmp_path / d / "bad_images.csv").read_text().splitlines()[1:])
        assert listed("two") == listed("one") and [line.split(",")[0] for line in listed("one")] == ["bad_gone", "bad_head", "bad_zero"]


@pytest.mark.slow
def test_two_process_training_equals_one_process_with_double_accumulation(tiny_model: Path, synth_data: Path, tmp_path: Path) -> None:
    """2 processes x accumulation 1 == 1 process x accumulation 2 (same batches per step, across an epoch boundary), to
    1e-5, on 24 rows (4 steps an epoch)."""
    import pandas as pd

    data = synth_data / "train_24.csv"  # beside the images: their paths stay inside the data root
    if not data.exists():
        pd.read_csv(synth_data / "train.csv").iloc[:24].to_csv(data, index=False)
    sets = ["train.method=lora", "lora.r=4", "lora.dropout=0.0", "train.epochs=2", "train.batch_size=3", "train.eval_every=never",
            "train.report_to=[]", "train.lr=5e-3", "prompt.name=plain_ko", "image.size=64"]
    common = ["train", "--model", str(tiny_model), "--data", str(data), "--device", "cpu", "-q", *[a for s in sets for a in ("--set", s)]]
    run([sys.executable, "-m", "mcvqa", *common, "--set", "train.grad_accum=2", "--out", str(tmp_path / "one")])
    run(launch(2, *common, "--set", "train.grad_accum=1", "--out", str(tmp_path / "two")))
    a = load_file(str(tmp_path / "one" / "last" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
        moved += int(a[k].abs().sum() > 0)
    assert moved > 0

