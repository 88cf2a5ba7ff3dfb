"""One engine under every path (issue 16): each guarantee of plain predict holds for generate and every --tta method.

- interrupted mid-run and resumed: byte-identical submission and probabilities (online TENT/SAR excepted: with
  ``tta.episodic: false`` their weights carry across batches, documented; their episodic form is tested here);
- an unreadable image is skipped (answered with a blank image, listed in bad_images.csv) or stops the run naming
  its row, whatever the method;
- a real SIGKILL of ``--tta orders``, then ``--resume``.
Sharding of the methods under 2 processes is in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_in_process, make_image, run_cli as run

METHODS = {
    "generate": ["--scoring", "generate", "--set", "predict.max_new_tokens=2"],
    "orders": ["--tta", "orders"],
    "pride": ["--tta", "pride", "--set", "tta.pride_min=6"],
    "views": ["--tta", "views", "--set", "tta.views=[crop,colour]"],
    "orders+views+blend": ["--tta", "orders,views,blend", "--set", "tta.views=[crop]", "--set", "tta.blend_fraction=0.3"],
    "tent (episodic)": ["--tta", "tent", "--set", "tta.episodic=true", "--set", "tta.lr=1e-2"],
    "sar (episodic)": ["--tta", "sar", "--set", "tta.episodic=true", "--set", "tta.lr=1e-2", "--set", "tta.sar_e0=1.0"],
    "tpt": ["--tta", "tpt", "--set", "tta.select=0.5"],
    "zero": ["--tta", "zero"],
}



@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory) -> Path:
    """A LoRA adapter whose weights change the answers (blend and TENT/SAR on LoRA need one)."""
    import torch

    from mcvqa.config import load_config
    from mcvqa.model import attach_lora, load_model

    cfg = load_config(None, [f"model.name_or_path={tiny_model}", "model.device=cpu", "model.dtype=fp32", "lora.r=4"], env=False)
    model, _ = load_model(cfg.model)
    peft = attach_lora(model, cfg.lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("adapter") / "a"
    peft.save_pretrained(str(out), safe_serialization=True)
    (out / "mcvqa.yaml").write_text("image:\n  mode: letterbox\n  size: 64\n", encoding="utf-8")
    return out


def base(tiny_model: Path, adapter: Path, data: Path) -> list[str]:
    return ["predict", "--model", str(tiny_model), "--adapter", str(adapter), "--data", str(data), "-q", "--batch-size", "4", "--set", "image.size=64"]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_resumes_byte_identical(method: str, tiny_model: Path, adapter: Path, synth_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import mcvqa.engine as E

    argv = base(tiny_model, adapter, synth_data / "test.csv") + METHODS[method]
    code, _, err = run(argv + ["--out", str(tmp_path / "full")], capsys)
    assert code == 0, err
    real = E.Engine._scored
    calls = {"n": 0}

    def dies_on_third(self, fn, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the middle of the run
        return real(self, fn, batch)

    monkeypatch.setattr(E.Engine, "_scored", dies_on_third)
    code, _, _ = run(argv + ["--out", str(tmp_path / "cut")], capsys)
    assert code == 130 and not (tmp_path / "cut" / "submission.csv").exists()
    monkeypatch.setattr(E.Engine, "_scored", real)
    code, _, err = run(argv + ["--out", str(tmp_path / "cut"), "--resume"], capsys)
    assert code == 0 and "resuming:" in err, err
    assert json.loads((tmp_path / "cut" / "predict_summary.json").read_text())["resumed_batches"] == 2
    for f in ("submission.csv", "probs.csv"):
        assert (tmp_path / "cut" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), (method, f)


@pytest.fixture(scope="module")
def with_bad_image(synth_data: Path, tmp_path_factory) -> Path:
    """The synthetic test set plus one row whose JPEG is cut short (passes the header check, fails to decode)."""
    root = tmp_path_factory.mktemp("bad") / "d"
    shutil.copytree(synth_data, root)
    full = make_image(root / "test" / "full.jpg", size=(300, 200))
    from PIL import Image

    Image.effect_noise((300, 200), 60).convert("RGB").save(full, quality=95)
    data = full.read_bytes()
    (root / "test" / "cut.jpg").write_bytes(data[: len(data) // 3])
    text = (root / "test.csv").read_text(encoding="utf-8")
    (root / "test.csv").write_text(text + "bad_1,test/cut.jpg,무엇인가요?,가,나,다,라\n", encoding="utf-8")
    return root / "test.csv"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_skips_a_bad_image(method: str, tiny_model: Path, adapter: Path, with_bad_image: Path, tmp_path: Path, capsys) -> None:
    argv = base(tiny_model, adapter, with_bad_image) + METHODS[method] + ["--out", str(tmp_path / "o")]
    code, _, err = run(argv + ["--on-bad-image", "skip"], capsys)
    assert code == 0, err
    assert "1 image(s) could not be read" in err
    bad = (tmp_path / "o" / "bad_images.csv").read_text().splitlines()
    assert bad[0] == "id,problem" and bad[1].startswith("bad_1,") and len(bad) == 2
    assert (tmp_path / "o" / "submission.csv").read_text().splitlines()[-1].startswith("bad_1,")


def test_a_bad_image_stops_a_method_naming_its_row(tiny_model: Path, adapter: Path, with_bad_image: Path, tmp_path: Path, capsys) -> None:
    argv = base(tiny_model, adapter, with_bad_image) + ["--tta", "orders,views", "--out", str(tmp_path / "o")]
    code, out, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in out + err and err.count("\n") == 1
    assert err.startswith(f"error: {with_bad_image} row 25, column path: image of id bad_1: truncated or corrupt image data"), err
    assert not (tmp_path / "o" / "submission.csv").exists()


@pytest.mark.slow
def test_sigkill_during_orders_then_resume(tiny_model: Path, adapter: Path, tmp_path: Path) -> None:
    from mcvqa.synth import SynthConfig, synthesize

    synthesize(tmp_path / "d", SynthConfig(train=0, test=64, seed=8))
    argv = [sys.executable, "-m", "mcvqa", *base(tiny_model, adapter, tmp_path / "d" / "test.csv"), "--tta", "orders", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code, err = cli_in_process([*argv[3:], "--out", str(tmp_path / "full")])
    assert code == 0, err
    proc = subprocess.Popen(argv + ["--out", str(tmp_path / "cut")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = tmp_path / "cut" / "journal.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    code, err = cli_in_process([*argv[3:], "--out", str(tmp_path / "cut"), "--resume"])
    assert code == 0 and "resuming:" in err, err
    for f in ("submission.csv", "probs.csv", "per_order.csv"):
        assert (tmp_path / "cut" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f


def test_blend_through_the_cli_weighs_the_base_model_as_told(tiny_model: Path, adapter: Path, synth_data: Path, tmp_path: Path, capsys) -> None:
    """--tta blend on the path predict runs: weight 0 is the adapted model, weight 1 on every question is the base
    model alone (no adapter), and a weight in between lies between the two in log space."""
    import numpy as np
    import pandas as pd

    data = ["--data", str(synth_data / "test.csv"), "--device", "cpu", "-q"]

    def probs(name: str, *argv: str) -> np.ndarray:
        code, _, err = run(["predict", "--model", str(tiny_model), *data, "--out", str(tmp_path / name), *argv], capsys)
        assert code == 0, err
        return pd.read_csv(tmp_path / name / "probs.csv")[["p_a", "p_b", "p_c", "p_d"]].to_numpy()

    adapted = probs("adapted", "--adapter", str(adapter))
    base = probs("base")
    blend = ["--adapter", str(adapter), "--tta", "blend", "--set", "tta.blend_fraction=1.0"]
    # The adapted run folds the adapter into the weights (predict.merge_adapter) and the blend keeps it apart to switch
    # it off: the same model up to fp32 rounding (1.4e-6 seen after other tests in the same process), hence 1e-5.
    np.testing.assert_allclose(probs("w0", *blend, "--set", "tta.blend_weight=0.0"), adapted, atol=1e-5)
    np.testing.assert_allclose(probs("w1", *blend, "--set", "tta.blend_weight=1.0"), base, atol=1e-6)
    half = probs("w03", *blend, "--set", "tta.blend_weight=0.3")
    mixed = np.exp(0.7 * np.log(adapted) + 0.3 * np.log(base))
    np.testing.assert_allclose(half, mixed / mixed.sum(1, keepdims=True), atol=1e-6)


def test_a_batch_is_recorded_after_the_next_is_queued_and_before_a_failure(encoder, synth_data: Path, tmp_path: Path) -> None:
    """Results stay on the device until the next batch is queued (the copy back overlaps it); a batch that fails
    must not take the finished one before it along: the journal holds every batch scored before the failure, and a
    resumed run scores only the rest."""
    import numpy as np
    import torch

    from mcvqa.data import read_csv
    from mcvqa.engine import Engine, Journal, Scored

    items = read_csv(synth_data / "train.csv").items[:8]
    journal = Journal(tmp_path / "journal.jsonl", "f")
    journal.start()
    calls: list[list[str]] = []

    def fn(questions) -> Scored:
        calls.append([q.id for q in questions])
        if len(calls) == 3:
            raise RuntimeError("the third batch fails")
        return Scored(torch.full((len(questions), 4), 0.25))  # a tensor, as the plain step returns

    engine = Engine(items[:8], encoder, batch_size=2, journal=journal, progress=False)
    with pytest.raises(RuntimeError, match="third"):
        engine.map("p", range(8), fn)
    assert sorted(journal.load()) == [("p", 0), ("p", 1)]
    calls.clear()
    engine = Engine(items[:8], encoder, batch_size=2, journal=journal, done=journal.load(), progress=False)
    out = engine.map("p", range(8), lambda qs: calls.append([q.id for q in qs]) or Scored(np.full((len(qs), 4), 0.25)))
    assert calls == [[it.id for it in items[4:6]], [it.id for it in items[6:8]]] and out.probs.shape == (8, 4) and np.allclose(out.probs, 0.25)
    assert sorted(journal.load()) == [("p", b) for b in range(4)]


def test_the_loaders_batches_arrive_pinned_and_move_without_waiting(encoder, synth_data, monkeypatch) -> None:
    """A copy from pageable memory to a GPU waits for the GPU's queued work, so a batch that was not pinned made the
    host wait for the previous batch before queueing this one (the CLI's profile: the GPU idle ~10% of the time).
    The DataLoader's pin thread pins only what it knows or what has ``pin_memory``: every tensor of a Batch must be
    pinned by it, and ``to_device`` pins a CPU tensor bound for a GPU that is not pinned yet (and only then)."""
    import torch
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pin

    from mcvqa import runtime
    from mcvqa.data import read_csv
    from mcvqa.features import collate

    pinned: list[int] = []

    def fake_pin(self, *a, **k):  # this machine has no GPU to page-lock for: copy as pinning does (same strides), marked
        out = torch.empty_strided(self.size(), self.stride(), dtype=self.dtype).copy_(self)
        out._fake_pinned = True
        pinned.append(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    items = read_csv(synth_data / "train.csv").items[:3]
    batch = collate([encoder.encode(it) for it in items], encoder.pad_id)
    batch.labels = torch.tensor([0, 1, 2])
    out = loader_pin(batch)

    def tensors_of(b):  # every tensor a Batch carries, whatever fields it gains later
        import dataclasses

        values = [getattr(b, f.name) for f in dataclasses.fields(b) if f.name != "host"]
        return [t for v in values for t in (v.values() if isinstance(v, dict) else [v]) if isinstance(t, torch.Tensor)]

    tensors = tensors_of(out)
    assert len(tensors) == 4 + len(batch.vision)
    assert all(getattr(t, "_fake_pinned", False) for t in tensors)
    assert torch.equal(out.input_ids, batch.input_ids) and out.ids == batch.ids

    moved: list[tuple[bool, torch.device]] = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: getattr(self, "_fake_pinned", False))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: moved.append((getattr(self, "_fake_pinned", False) and non_blocking, device)) or self)
    runtime.to_device(torch.zeros(2), "cuda")
    runtime.to_device(out.input_ids, "cuda")
    runtime.to_device(torch.zeros(2), "cpu")
    runtime.to_device(torch.arange(3).expand(2, 3), "cuda")  # positions broadcast over the batch (Gemma 4): pinnable
    assert [m[0] for m in moved] == [True, True, False, True] and len(pinned) == len(tensors) + 2
    moved.clear()
    batch.to("cuda")  # a batch made outside the loader (the model-alone benchmarks, TTA's own batches)
    assert len(moved) == len(tensors) and all(ok for ok, _ in moved)
