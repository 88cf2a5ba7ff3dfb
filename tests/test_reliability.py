"""Crashes lose nothing: SIGKILL mid-predict, torn journals, out-of-memory, atomic writes; no unsafe code paths."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import cli_in_process
from mcvqa.errors import McvqaError
from mcvqa.io import atomic_write_csv
from mcvqa.predict import JOURNAL, build_scorer, predict
from mcvqa.synth import SynthConfig, synthesize

SRC = Path(__file__).resolve().parent.parent / "src" / "mcvqa"


@pytest.fixture(scope="module")
def big_test(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("big")
    synthesize(out, SynthConfig(train=0, test=64, seed=21))
    return out / "test.csv"


def _cmd(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mcvqa", "predict", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
            "--batch-size", "2", "--image-size", "128", "--device", "cpu", "-q", *extra]


def _journaled(journal: Path) -> dict[str, list[float]]:
    """The probabilities already on disk when the run was cut, by id (a torn last line is not kept)."""
    kept: dict[str, list[float]] = {}
    for line in journal.read_text(encoding="utf-8").split("\n")[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        kept.update(zip(rec["ids"], rec["probs"]))
    return kept


def _assert_same_as_uninterrupted(cut: Path, ref: Path, kept: dict[str, list[float]]) -> None:
    """What the resumed run wrote is what an uninterrupted run writes: the same submission byte for byte, and every row
    the journal kept written from the journal exactly (not scored again). Rows scored after the cut are compared to
    1e-5: the same batch scored twice on CPU may differ in the last float32 digit (MKL picks its threads and kernels per
    call), which is the BLAS, not the resume."""
    assert (cut / "submission.csv").read_bytes() == (ref / "submission.csv").read_bytes()
    got, want = pd.read_csv(cut / "probs.csv"), pd.read_csv(ref / "probs.csv")
    assert list(got["id"]) == list(want["id"]) and list(got["answer"]) == list(want["answer"])
    cols = [f"p_{l}" for l in "abcd"]
    assert (got[cols] - want[cols]).abs().to_numpy().max() < 1e-5
    assert kept
    rows = got.set_index("id")
    for qid, probs in kept.items():
        assert list(rows.loc[qid, cols]) == [float(f"{p:.8g}") for p in probs], qid


@pytest.fixture(scope="module")
def uninterrupted(tiny_model: Path, big_test: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "full"
    code, err = cli_in_process(_cmd(tiny_model, big_test, out)[3:])
    assert code == 0, err
    return out


def test_sigkill_then_resume_matches_uninterrupted(tiny_model: Path, big_test: Path, uninterrupted: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cmd(tiny_model, big_test, tmp_path / "cut"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = tmp_path / "cut" / JOURNAL
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make the test data bigger"
    assert not (tmp_path / "cut" / "submission.csv").exists()
    done_before = journal.read_bytes().count(b"\n") - 1
    kept = _journaled(journal)
    code, err = cli_in_process(_cmd(tiny_model, big_test, tmp_path / "cut", "--resume")[3:])
    assert code == 0, err
    assert "resuming:" in err
    assert json.loads((tmp_path / "cut" / "predict_summary.json").read_text())["resumed_batches"] >= done_before - 1
    _assert_same_as_uninterrupted(tmp_path / "cut", uninterrupted, kept)


@pytest.fixture()
def signals_caught():
    """The test's own SIGINT/SIGTERM handlers around each command (mcvqa's main installs its own while it runs), so a
    signal that arrives after a command ended is recorded instead of ending the test session."""
    stray: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, f: stray.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield stray
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def signal_when(ready, sig: int) -> threading.Thread:
    """A real signal to this process (the command runs in its main thread) as soon as ``ready()``."""

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if ready():
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_then_sigterm_then_resume_matches_uninterrupted(tiny_model: Path, big_test: Path, uninterrupted: Path, tmp_path: Path, capsys, signals_caught) -> None:
    """Ctrl-C mid-run, then SIGTERM in the middle of its --resume: each ends in one line saying what was kept and how to
    continue (exit 130, 143; no traceback), the journal grows across them, and the last --resume writes the submission an
    uninterrupted run writes (see `_assert_same_as_uninterrupted`). Real signals, to the process the command runs in."""
    from conftest import run_cli

    argv = _cmd(tiny_model, big_test, tmp_path / "cut")[3:]
    journal = tmp_path / "cut" / JOURNAL
    lines = lambda: journal.read_bytes().count(b"\n") if journal.exists() else 0
    for sig, name, at, extra in ((signal.SIGINT, "Ctrl-C", 6, []), (signal.SIGTERM, "SIGTERM", 14, ["--resume"])):
        watcher = signal_when(lambda: lines() >= at, sig)
        code, out, err = run_cli(argv + extra, capsys)
        watcher.join(timeout=60)
        assert not signals_caught, "the run finished before it could be interrupted; make the test data bigger"
        assert code == 128 + sig and "Traceback" not in out + err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"interrupted ({name}): every batch scored so far is kept in") and "--resume" in last, err
        assert not (tmp_path / "cut" / "submission.csv").exists()
    assert lines() >= 14
    kept = _journaled(journal)
    code, _, err = run_cli(argv + ["--resume"], capsys)
    assert code == 0 and "resuming:" in err, err
    _assert_same_as_uninterrupted(tmp_path / "cut", uninterrupted, kept)


def test_torn_journal_line_is_ignored(cfg_factory, tiny_loaded, synth_data, tmp_path) -> None:
    cfg = cfg_factory("predict.batch_size=4")
    scorer = build_scorer(cfg, model=tiny_loaded[0], processor=tiny_loaded[1])
    ref = predict(cfg, synth_data / "test.csv", tmp_path / "ref", scorer=scorer, progress=False, log=lambda s: None)
    out = tmp_path / "torn"
    predict(cfg, synth_data / "test.csv", out, scorer=scorer, progress=False, log=lambda s: None)
    # Rebuild the state of a kill in the middle of writing the third batch's line.
    done = (out / (JOURNAL + ".done")).read_text().splitlines(keepends=True)
    (out / JOURNAL).write_text("".join(done[:3]) + done[3][: len(done[3]) // 2])
    for f in ("submission.csv", "probs.csv"):
        (out / f).unlink()
    res = predict(cfg, synth_data / "test.csv", out, scorer=scorer, resume=True, progress=False, log=lambda s: None)
    assert res.resumed_batches == 2
    assert res.submission.read_bytes() == ref.submission.read_bytes()


def test_journal_from_another_run_is_refused(cfg_factory, tiny_loaded, synth_data, tmp_path) -> None:
    from mcvqa.errors import McvqaError

    scorer = build_scorer(cfg_factory(), model=tiny_loaded[0], processor=tiny_loaded[1])
    out = tmp_path / "r"
    out.mkdir()
    (out / JOURNAL).write_text(json.dumps({"fingerprint": "someone-else"}) + "\n")
    with pytest.raises(McvqaError, match="written by a different model, adapter, data or settings"):
        predict(cfg_factory(), synth_data / "test.csv", out, scorer=scorer, resume=True, progress=False, log=lambda s: None)


def test_out_of_memory_halves_the_batch(cfg_factory, tiny_loaded, synth_data, tmp_path, monkeypatch) -> None:
    cfg = cfg_factory("predict.batch_size=8")
    scorer = build_scorer(cfg, model=tiny_loaded[0], processor=tiny_loaded[1])
    ref = predict(cfg_factory("predict.batch_size=2"), synth_data / "test.csv", tmp_path / "ref", scorer=scorer, progress=False, log=lambda s: None)
    real = scorer.logprobs

    def small_gpu(batch, grad=False):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, grad)

    monkeypatch.setattr(scorer, "logprobs", small_gpu)
    messages: list[str] = []
    res = predict(cfg, synth_data / "test.csv", tmp_path / "oom", scorer=scorer, progress=False, log=messages.append)
    summary = json.loads((tmp_path / "oom" / "predict_summary.json").read_text())
    assert summary["batch_size_used"] == 2 and summary["oom_halvings"] > 0
    assert any("continued with batch size 2" in m for m in messages)
    a, b = pd.read_csv(res.probs), pd.read_csv(ref.probs)
    assert (a["answer"] == b["answer"]).all()
    assert (a[["p_a", "p_b", "p_c", "p_d"]] - b[["p_a", "p_b", "p_c", "p_d"]]).abs().max().max() < 1e-6


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch) -> None:
    atomic_write_csv(tmp_path / "submission.csv", pd.DataFrame({"id": ["a"], "answer": ["b"]}))
    before = (tmp_path / "submission.csv").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_csv(tmp_path / "submission.csv", pd.DataFrame({"id": ["x"], "answer": ["c"]}))
    assert (tmp_path / "submission.csv").read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # and no temp file is left behind


FORBIDDEN = {
    r"\bsubprocess\b": "no process is ever started from data",
    r"os\.system|os\.popen|shell\s*=\s*True": "no shell is ever built",
    r"^\s*(import|from)\s+(pickle|marshal|dill|cloudpickle)\b|pickle\.loads?\(": "no pickle",
    r"(?<![\w.])eval\(|(?<![\w.])exec\(": "no eval/exec",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load only with weights_only=True",
    r"trust_remote_code=True": "remote code only when the config says so",
}


@pytest.mark.parametrize("pattern", list(FORBIDDEN))
def test_source_has_no_unsafe_calls(pattern: str) -> None:
    hits = []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                hits.append(f"{path.name}:{n}: {line.strip()}")
    assert not hits, f"{FORBIDDEN[pattern]}: {hits}"


def _train_cmd(tiny_model: Path, synth_data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mcvqa", "train", "--model", str(tiny_model), "--data", str(synth_data / "train.csv"), "--out", str(out),
            "--device", "cpu", "-q", "--set", "train.method=lora", "--set", "lora.r=4", "--set", "train.epochs=1", "--set", "train.batch_size=4",
            "--set", "train.checkpoint_every_steps=1", "--set", "train.save_total_limit=2", "--set", "train.report_to=[]",
            "--set", "prompt.name=plain_ko", "--set", "image.size=64", *extra]


@pytest.fixture(scope="module")
def straight_training(tiny_model: Path, synth_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "straight"
    code, err = cli_in_process(_train_cmd(tiny_model, synth_data, out)[3:])
    assert code == 0, err
    return out


def _same_adapter(a_dir: Path, b_dir: Path) -> bool:
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "last" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "last" / "adapter_model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_training_then_resume(tiny_model: Path, synth_data: Path, straight_training: Path, tmp_path: Path) -> None:
    """Killed at an arbitrary moment (after a few checkpoints), `train --resume` ends with the same weights."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(tiny_model, synth_data, tmp_path / "cut"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = sorted(ckpts.glob("step_*[0-9]")) if ckpts.exists() else []
        if steps and int(steps[-1].name.split("_")[1]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    code, err = cli_in_process(_train_cmd(tiny_model, synth_data, tmp_path / "cut", "--resume")[3:])
    assert code == 0, err
    assert "resumed from" in err
    assert _same_adapter(straight_training, tmp_path / "cut")


def test_ctrl_c_during_training_then_resume(tiny_model: Path, synth_data: Path, straight_training: Path, tmp_path: Path, capsys, signals_caught) -> None:
    """Ctrl-C after a few checkpoints: one line names the checkpoint kept, no traceback, exit 130; `train --resume`
    ends with the weights of an uninterrupted run, bit for bit (a real SIGINT to the process the command runs in)."""
    from conftest import run_cli

    argv = _train_cmd(tiny_model, synth_data, tmp_path / "cut")[3:]
    ckpts = tmp_path / "cut" / "checkpoints"

    def ready() -> bool:
        steps = sorted(ckpts.glob("step_*[0-9]")) if ckpts.exists() else []
        return bool(steps) and int(steps[-1].name.split("_")[1]) >= 3

    watcher = signal_when(ready, signal.SIGINT)
    code, out, err = run_cli(argv, capsys)
    watcher.join(timeout=60)
    assert not signals_caught and code == 130, "training finished before it could be interrupted"
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in out + err and re.match(r"interrupted \(Ctrl-C\): .*checkpoints/step_\d+ is kept; the same command with --resume", last), err
    code, _, err = run_cli(argv + ["--resume"], capsys)
    assert code == 0 and "resumed from" in err, err
    assert _same_adapter(straight_training, tmp_path / "cut")


def test_replace_dir_recovers_from_a_kill_between_renames(tmp_path) -> None:
    from mcvqa.io import recover_dir, replace_dir

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "w").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "w").write_text("new")
    replace_dir(tmp_path / "new", tmp_path / "best")
    assert (tmp_path / "best" / "w").read_text() == "new" and not (tmp_path / "best.old").exists()
    os.replace(tmp_path / "best", tmp_path / "best.old")  # the state a kill between the renames leaves
    recover_dir(tmp_path / "best")
    assert (tmp_path / "best" / "w").read_text() == "new"


def test_journal_is_fsynced_for_every_batch(cfg_factory, tiny_loaded, synth_data, tmp_path, monkeypatch) -> None:
    """A batch counts as done only once it is on disk: one fsync of the journal per scored batch."""
    scorer = build_scorer(cfg_factory(), model=tiny_loaded[0], processor=tiny_loaded[1])
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    predict(cfg_factory("predict.batch_size=5"), synth_data / "test.csv", tmp_path / "r", scorer=scorer, progress=False, log=lambda s: None)
    batches = -(-24 // 5)
    assert sum(p.endswith(JOURNAL) for p in synced) == 1 + batches  # the header, then each batch


@pytest.mark.parametrize("change", ["adapter", "data file", "ids"])
def test_resume_refuses_a_journal_of_another_adapter_data_or_ids(cfg_factory, tiny_loaded, synth_data, tmp_path, monkeypatch, change) -> None:
    import shutil


    scorer = build_scorer(cfg_factory(), model=tiny_loaded[0], processor=tiny_loaded[1])
    shutil.copytree(synth_data, tmp_path / "d")
    for name in ("a1", "a2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(name.encode())
    calls = {"n": 0}
    real = scorer.logprobs  # the forward the engine calls for each batch

    def dies_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(scorer, "logprobs", dies_on_second)
    cfg = cfg_factory("predict.batch_size=8")
    with pytest.raises(KeyboardInterrupt):
        predict(cfg, tmp_path / "d" / "test.csv", tmp_path / "r", scorer=scorer, adapter=tmp_path / "a1", progress=False, log=lambda s: None)
    monkeypatch.setattr(scorer, "logprobs", real)
    data, adapter = tmp_path / "d" / "test.csv", tmp_path / "a1"
    if change == "adapter":
        adapter = tmp_path / "a2"
    elif change == "data file":
        shutil.copytree(tmp_path / "d", tmp_path / "d2")
        data = tmp_path / "d2" / "test.csv"
    else:
        df = pd.read_csv(data)
        df["id"] = [f"other_{i}" for i in range(len(df))]
        df.to_csv(data, index=False)
    with pytest.raises(McvqaError, match="written by a different model, adapter, data or settings"):
        predict(cfg, data, tmp_path / "r", scorer=scorer, adapter=adapter, resume=True, progress=False, log=lambda s: None)
