"""Hostile environments (issue 20): a disk that fills up mid-run, and files damaged by an interrupted copy.

Each ends in one ``error:`` line with exit code 2, leaves no output of the failed run under its final name,
and (predict, train) finishes with ``--resume`` once space is back. The full disk is real: a small tmpfs is
mounted for the test (root only; elsewhere these tests skip with one line) and filled at the worst moment.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli as run

LORA = ["--set", "train.method=lora", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.dropout=0.0",
        "--set", "train.batch_size=8", "--set", "train.report_to=[]", "--set", "prompt.name=plain_ko", "--set", "image.size=64",
        "--set", "model.device=cpu", "--set", "model.dtype=fp32", "--set", "train.epochs=2", "--set", "train.gradient_checkpointing=false"]



def _tmpfs(where: Path, options: str):
    """A filesystem of its own at ``where`` (root only; elsewhere the test skips with one line), unmounted after."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here ({r.stderr.strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture()
def disk(tmp_path: Path):
    """A 4 MiB filesystem of its own, so it can really run out of space."""
    yield from _tmpfs(tmp_path / "disk", "size=4m")


def fill(where: Path) -> Path:
    """Fill the filesystem holding ``where`` to the last byte; delete the returned file to free it."""
    filler = where / "filler"
    with filler.open("wb", buffering=0) as fh:  # unbuffered: no data left to flush (and fail) at close
        for size in (1 << 16, 4096, 512, 1):  # down to the last byte
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def test_predict_disk_full_while_writing_outputs(disk: Path, tiny_model: Path, synth_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import mcvqa.io as io

    base = ["predict", "--model", str(tiny_model), "--data", str(synth_data / "test.csv"), "-q", "--set", "image.size=64", "--batch-size", "5"]
    assert run(base + ["--out", str(tmp_path / "ref")], capsys)[0] == 0
    real = io._stage
    state = {}

    def fills_between_outputs(path, *a, **k):  # probs.csv fits; the disk is full by submission.csv
        if path.name == "submission.csv" and "filler" not in state:
            state["filler"] = fill(disk)
        return real(path, *a, **k)

    monkeypatch.setattr(io, "_stage", fills_between_outputs)
    out = disk / "run"
    code, _, err = run(base + ["--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: no space left on the device holding {out}: ") and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["journal.jsonl"]  # no output with a final name, no temp file
    monkeypatch.setattr(io, "_stage", real)
    state["filler"].unlink()
    code, _, err = run(base + ["--out", str(out), "--resume"], capsys)
    assert code == 0 and "resuming: 24 of 24 questions already scored" in err
    assert (out / "submission.csv").read_bytes() == (tmp_path / "ref" / "submission.csv").read_bytes()
    assert (out / "probs.csv").read_bytes() == (tmp_path / "ref" / "probs.csv").read_bytes()


@pytest.mark.slow
def test_train_disk_full_at_a_checkpoint_then_resume(disk: Path, tiny_model: Path, synth_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import mcvqa.checkpoint as T
    from safetensors.torch import load_file

    base = ["train", "--model", str(tiny_model), "--data", str(synth_data / "train.csv"), "-q", *LORA]
    assert run(base + ["--out", str(tmp_path / "ref")], capsys)[0] == 0
    real = T.save_checkpoint
    state = {"calls": 0}

    def fills_at_second(*a, **k):
        state["calls"] += 1
        if state["calls"] == 2:  # the end of epoch 2: epoch 1's checkpoint is on disk
            state["filler"] = fill(disk)
        return real(*a, **k)

    monkeypatch.setattr(T, "save_checkpoint", fills_at_second)
    out = disk / "run"
    code, _, err = run(base + ["--out", str(out)], capsys)
    last = err.strip().splitlines()[-1]  # after the epochs' progress lines: one error line, no traceback
    assert code == 2 and "Traceback" not in err and last.startswith(f"error: no space left on the device holding {out / 'checkpoints'}: step_0000006"), err
    assert not any((out / name).exists() for name in ("best", "last", "metrics.json", "loss.png"))
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_0000003"] and leftovers(out) == []
    monkeypatch.setattr(T, "save_checkpoint", real)
    state["filler"].unlink()
    code, _, err = run(base + ["--out", str(out), "--resume"], capsys)
    assert code == 0 and "resumed from" in err, err
    a = load_file(str(tmp_path / "ref" / "last" / "adapter_model.safetensors"))
    b = load_file(str(out / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # as if nothing had happened
    assert (out / "best" / "adapter_model.safetensors").exists() and (out / "metrics.json").exists()


def test_ensemble_disk_full(disk: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import numpy as np
    import pandas as pd

    import mcvqa.outputs as P

    p = tmp_path / "m" / "probs.csv"
    p.parent.mkdir()
    pd.DataFrame({"id": ["q1", "q2"], **{f"p_{l}": np.full(2, 0.25) for l in "abcd"}}).to_csv(p, index=False)
    real = P.write_outputs
    monkeypatch.setattr(P, "write_outputs", lambda *a, **k: (fill(disk), real(*a, **k))[1])
    code, _, err = run(["ensemble", "-p", str(p), "-p", str(p), "--out", str(disk / "ens")], capsys)
    assert code == 2 and err.startswith(f"error: no space left on the device holding {disk / 'ens'}") and err.count("\n") == 1
    assert not (disk / "ens").exists() or sorted(x.name for x in (disk / "ens").iterdir()) == []


# ---------------------------------------------------------------------------------------------- damaged files


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory) -> Path:
    from mcvqa.config import load_config
    from mcvqa.model import attach_lora, load_model

    cfg = load_config(None, [f"model.name_or_path={tiny_model}", "model.device=cpu", "model.dtype=fp32", "lora.r=4"], env=False)
    model, _ = load_model(cfg.model)
    out = tmp_path_factory.mktemp("adapter") / "a"
    attach_lora(model, cfg.lora).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.mark.parametrize("what", ["adapter", "model shard", "tokenizer.json", "config.json"])
def test_damaged_files_are_named_in_one_line(what: str, tiny_model: Path, adapter: Path, synth_data: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    ad = tmp_path / "adapter"
    shutil.copytree(adapter, ad)
    damaged = {"adapter": ad / "adapter_model.safetensors", "model shard": model / "model.safetensors",
               "tokenizer.json": model / "tokenizer.json", "config.json": model / "config.json"}[what]
    _cut(damaged)
    argv = ["predict", "--model", str(model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o"), "-q"]
    if what == "adapter":
        argv += ["--adapter", str(ad)]
    code, out, err = run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in out + err, err
    assert err.startswith(f"error: {damaged}: damaged") and "re-copy it" in err, err
    assert not (tmp_path / "o" / "journal.jsonl").exists()  # refused before anything started


@pytest.fixture()
def readonly(tmp_path: Path):
    """A read-only filesystem of its own (a tmpfs mounted ro)."""
    yield from _tmpfs(tmp_path / "ro", "size=1m,ro")


def test_outputs_that_cannot_be_written_are_one_line_before_any_work(readonly: Path, tiny_model: Path, synth_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """--out an existing file, a folder on a read-only filesystem, a file where a folder is: one line each, exit 2,
    before the model loads (the loader is never called), and the existing file untouched."""
    import mcvqa.model as model_module

    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    afile = tmp_path / "taken.txt"
    afile.write_text("keep me")
    test, train = str(synth_data / "test.csv"), str(synth_data / "train.csv")
    cases = {
        "predict, an existing file": (["predict", "--model", str(tiny_model), "--data", test, "--out", str(afile)], "is a file, not a folder"),
        "train, an existing file": (["train", "--model", str(tiny_model), "--data", train, "--out", str(afile)], "is a file, not a folder"),
        "ensemble, an existing file": (["ensemble", "-p", test, "--out", str(afile)], "is a file, not a folder"),
        "predict, read-only filesystem": (["predict", "--model", str(tiny_model), "--data", test, "--out", str(readonly / "o")], "cannot write there (read-only file system)"),
        "train, read-only filesystem": (["train", "--model", str(tiny_model), "--data", train, "--out", str(readonly / "o")], "cannot write there (read-only file system)"),
        "evaluate, a folder": (["evaluate", "--pred", test, "--data", test, "--out", str(tmp_path)], "is a folder; pass a file name"),
        "report, a folder": (["report", "--pred", test, "--data", test, "--out", str(tmp_path)], "is a folder; pass a file name"),
        "report, read-only filesystem": (["report", "--pred", test, "--data", test, "--out", str(readonly / "r.html")], "cannot write there (read-only file system)"),
    }
    for name, (argv, message) in cases.items():
        code, out, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in out + err, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: --out ") and message in err, (name, err)
    assert afile.read_text() == "keep me"


def test_a_processor_that_fails_is_one_line_before_any_weight_loads(tiny_model: Path, synth_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A tokenizer.json that parses but is no tokenizer: one line naming the folder, and the weights were never
    started (the processor loads first, so a broken one costs seconds, not the minutes of an 8B load)."""
    import transformers

    started: list[str] = []
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: started.append("weights"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}', encoding="utf-8")
    code, out, err = run(["predict", "--model", str(model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in out + err, err
    assert err.startswith(f"error: {model}: cannot load the tokenizer and processor"), err
    assert started == [] and not (tmp_path / "o" / "journal.jsonl").exists()


def test_load_reports_its_parts(tiny_model: Path, cfg_factory) -> None:
    """load_model's laps: each part of the load, one after the other."""
    from mcvqa.model import load_model

    laps: dict[str, float] = {}
    load_model(cfg_factory().model, laps=laps)
    assert set(laps) == {"checks", "processor", "weights", "kernels"} and all(v >= 0 for v in laps.values())
