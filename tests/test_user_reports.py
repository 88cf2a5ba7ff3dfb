"""What a new user hit (issue 19), each through the real command line: every test here failed before its fix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_csv, run_cli as run



def probs_csv(path: Path, ids: list[str], p: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"id": ids, **{f"p_{l}": p[:, k] for k, l in enumerate("abcd")}})
    df.to_csv(path, index=False)
    return path


@pytest.fixture()
def two_members(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(6)]
    a = rng.dirichlet(np.ones(4), size=6)
    b = rng.dirichlet(np.ones(4), size=6)
    return probs_csv(tmp_path / "m1" / "probs.csv", ids, a), probs_csv(tmp_path / "m2" / "probs.csv", ids, b)


# 1. weights that make no ensemble -------------------------------------------------------------------------


@pytest.mark.parametrize("weights, says", [("1,-1", "-1.0 is not allowed"), ("0,0", "all zero"), ("1,nan", "nan is not allowed"), ("1,inf", "inf is not allowed")])
def test_ensemble_refuses_weights_that_make_no_average(tmp_path: Path, two_members, capsys, weights: str, says: str) -> None:
    code, out, err = run(["ensemble", "-p", str(two_members[0]), "-p", str(two_members[1]), "--weights", weights, "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and says in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "e" / "submission.csv").exists() and not (tmp_path / "e" / "probs.csv").exists()


def test_ensemble_function_refuses_bad_weights_too() -> None:
    """The library call checks what the CLI checks: a script calling mcvqa.ensemble.combine gets no NaNs either."""
    from mcvqa.ensemble import combine as ensemble
    from mcvqa.errors import McvqaError

    p = np.full((2, 4), 0.25)
    for w in ([1, -1], [0, 0], [1, float("nan")], [1]):
        with pytest.raises(McvqaError):
            ensemble([p, p], w)


def test_submission_check_refuses_probabilities_that_are_not_a_distribution(tmp_path: Path) -> None:
    from mcvqa.errors import McvqaError
    from mcvqa.outputs import write_outputs

    good = np.full((3, 4), 0.25)
    for bad_row in ([np.nan] * 4, [0.5, 0.5, 0.5, 0.5], [1.2, -0.2, 0.0, 0.0], [np.inf, 0, 0, 0]):
        p = good.copy()
        p[1] = bad_row
        with pytest.raises(McvqaError, match="id 'q1'"):
            write_outputs(tmp_path / "o", ["q0", "q1", "q2"], p)
        assert not (tmp_path / "o" / "submission.csv").exists()


# 2. a weight that is not a number -------------------------------------------------------------------------


def test_ensemble_weight_that_is_not_a_number(tmp_path: Path, two_members, capsys) -> None:
    code, out, err = run(["ensemble", "-p", str(two_members[0]), "-p", str(two_members[1]), "--weights", "2,x", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and err == "error: --weights '2,x': 'x' is not a number; give one number per member, e.g. --weights 2,1,1\n"


# 3. outputs readable by teammates --------------------------------------------------------------------------


def test_outputs_follow_the_umask_not_0600(tmp_path: Path, two_members, capsys, monkeypatch) -> None:
    import mcvqa.io

    monkeypatch.setattr(mcvqa.io, "FILE_MODE", 0o644)  # what umask 022 gives, whatever this process's umask is
    for argv in (
        ["synth", "--out", str(tmp_path / "d"), "--train", "4", "--test", "4", "-q"],
        ["ensemble", "-p", str(two_members[0]), "-p", str(two_members[1]), "--out", str(tmp_path / "e")],
        ["tiny", "--out", str(tmp_path / "m"), "--vocab", "300", "--hidden", "32", "--layers", "1"],
    ):
        code, _, err = run(argv, capsys)
        assert code == 0, err
    written = [tmp_path / "d" / "train.csv", tmp_path / "d" / "test.csv", tmp_path / "e" / "submission.csv", tmp_path / "e" / "probs.csv",
               tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json"]
    for f in written:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f"{f}: {oct(stat.S_IMODE(f.stat().st_mode))}"


# 4. a full-model folder passed as --adapter ----------------------------------------------------------------


def test_full_model_as_adapter_is_refused_before_loading(tmp_path: Path, tiny_model: Path, synth_data: Path, capsys, monkeypatch) -> None:
    import mcvqa.model

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the adapter folder was checked")

    monkeypatch.setattr(mcvqa.model, "load_model", no_loading)
    t0 = time.perf_counter()
    code, _, err = run(["predict", "--model", str(tiny_model), "--adapter", str(tiny_model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err == f"error: {tiny_model}: this is a full model (train.method: full), not a LoRA adapter; pass it as --model {tiny_model}\n"
    assert time.perf_counter() - t0 < 10


# 5. paths as the user typed them -----------------------------------------------------------------------------


def test_errors_name_the_path_as_typed(tmp_path: Path, two_members, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["ensemble", "-p", "m1/probs.csv", "-p", "m3/probs.csv", "--out", "e"], capsys)
    assert code == 2 and err == "error: m3/probs.csv: file not found\n"
    write_csv(tmp_path / "sub" / "nod.csv", "id,path,question,a,b,c\nq,i.jpg,q,1,2,3\n")
    code, _, err = run(["predict", "--model", "x", "--data", "sub/nod.csv", "--out", "o"], capsys)
    assert code == 2 and err.startswith("error: sub/nod.csv: missing column d"), err


# 6. a Hub id without a network -----------------------------------------------------------------------------


@pytest.mark.parametrize("env, says", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"), ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached")])
def test_hub_id_without_network_fails_fast(tmp_path: Path, synth_data: Path, env: dict, says: str) -> None:
    """From process start (a subprocess): imports included, the answer comes in seconds, not minutes."""
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "mcvqa", "predict", "--model", "Qwen/Qwen3-VL-2B-Instruct", "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o")],
        env=full_env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and says in r.stderr and "Qwen/Qwen3-VL-2B-Instruct: no such local folder" in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 60  # process start and imports included; it took 2 min 33 s before


# 7. evaluate on partly or wholly other sets ------------------------------------------------------------------


def test_evaluate_says_what_it_left_out_and_refuses_no_overlap(tmp_path: Path, capsys) -> None:
    ids = [f"q{i}" for i in range(10)]
    p = np.eye(4)[np.arange(10) % 4] * 0.9 + 0.025
    pred = probs_csv(tmp_path / "probs.csv", ids, p)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"id": ids[:4] + ["x1"], "answer": ["a", "b", "c", "d", "a"]}).to_csv(labels, index=False)
    code, out, err = run(["evaluate", "--pred", str(pred), "--data", str(labels)], capsys)
    assert code == 0
    assert "4 questions in common (6 predictions without a label, 1 labels without a prediction)" in out
    assert "warning:" in err and "6 prediction(s) have no label" in err and "1 label(s) have no prediction" in err
    assert "accuracy   1.0000" in out  # the four in common are right
    other = tmp_path / "other.csv"
    pd.DataFrame({"id": ["z1", "z2"], "answer": ["a", "b"]}).to_csv(other, index=False)
    code, _, err = run(["evaluate", "--pred", str(pred), "--data", str(other)], capsys)
    assert code == 2 and "no id in common with the 2 labels" in err


# 8. --resume with nothing to resume, and on a finished run -----------------------------------------------------


def test_predict_resume_says_fresh_or_finished(tmp_path: Path, tiny_model: Path, synth_data: Path, capsys) -> None:
    base = ["predict", "--model", str(tiny_model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o"), "-q", "--resume"]
    code, _, err = run(base, capsys)
    assert code == 0 and f"no unfinished run in {tmp_path / 'o'} to resume; starting fresh" in err
    sub = tmp_path / "o" / "submission.csv"
    before = (sub.read_bytes(), sub.stat().st_mtime_ns)
    code, _, err = run(base, capsys)
    assert code == 0 and "this run is already finished" in err
    assert (sub.read_bytes(), sub.stat().st_mtime_ns) == before  # not rescored, not rewritten
    # a finished run of other settings is not taken for this one
    code, _, err = run(base + ["--prompt", "plain_en"], capsys)
    assert code == 2 and "written by a different model, adapter, data or settings" in err


@pytest.mark.slow
def test_train_resume_says_fresh_or_finished(tmp_path: Path, tiny_model: Path, synth_data: Path, capsys) -> None:
    argv = ["train", "--model", str(tiny_model), "--data", str(synth_data / "train.csv"), "--out", str(tmp_path / "t"), "-q", "--resume",
            "--set", "model.device=cpu", "--set", "model.dtype=fp32", "--set", "train.max_steps=2", "--set", "train.batch_size=8",
            "--set", "lora.r=4", "--set", "train.report_to=[]", "--set", "image.size=64", "--set", "prompt.name=plain_ko"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert f"no checkpoint in {tmp_path / 't'} to resume; starting fresh" in err
    from mcvqa.io import FILE_MODE

    adapter = (tmp_path / "t" / "last" / "adapter_model.safetensors").read_bytes()
    assert stat.S_IMODE((tmp_path / "t" / "last" / "adapter_model.safetensors").stat().st_mode) == FILE_MODE  # not safetensors' 0600
    code, _, err = run(argv, capsys)
    assert code == 0 and "training already finished (step 2 of 2); nothing to resume" in err
    assert (tmp_path / "t" / "last" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------------------- round 2 (issue 30)


def test_adapter_base_path_resolves_from_any_folder_and_carries_its_dtype_and_settings(tiny_model: Path, synth_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Items 1, 2 and 6: trained with a relative --model (and train's own --dtype/--image-size/--prompt flags), the
    adapter stores its base as an absolute path and says so; predict --adapter from another folder finds it and
    runs with the dtype, image size and prompt it was trained with."""
    import shutil

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, work / "models" / "tiny")
    monkeypatch.chdir(work)
    code, _, err = run(["train", "--model", "models/tiny", "--data", str(synth_data / "train.csv"), "--out", str(tmp_path / "run"), "-q",
                        "--dtype", "bf16", "--image-size", "96", "--prompt", "plain_en", "--set", "train.epochs=1", "--set", "train.batch_size=8",
                        "--set", "train.report_to=[]", "--set", "lora.r=4", "--device", "cpu"], capsys)
    assert code == 0, err
    err_train = err
    base = str((work / "models" / "tiny").resolve())
    assert f"base model {base} (stored in the adapter as an absolute path)" in err
    assert json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["predict", "--adapter", str(tmp_path / "run" / "best"), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "p"), "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    import yaml

    used = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())
    assert used["model"]["dtype"] == "bf16" and used["image"]["size"] == 96 and used["prompt"]["name"] == "plain_en"
    _held_out_rows_beside_the_run(tmp_path, synth_data, err_train, capsys)


def _held_out_rows_beside_the_run(tmp_path: Path, synth_data: Path, train_log: str, capsys) -> None:
    """Item 8: the run writes val.csv (its validation rows, images where they are), and evaluate, report and predict
    read it, from another folder, with the data's root given."""
    import pandas as pd

    from mcvqa.data import read_csv, stratified_split

    val = tmp_path / "run" / "val.csv"
    assert f"held-out rows: {val} (predict or report on them with --data-root {synth_data.resolve()})" in train_log
    expected = stratified_split(read_csv(synth_data / "train.csv"), 0.2, 42)[1]
    rows = pd.read_csv(val, dtype=str)
    assert list(rows["id"]) == [it.id for it in expected.items] and list(rows.columns) == ["id", "path", "question", "a", "b", "c", "d", "answer"]
    assert list(rows["answer"]) == [it.answer_letter for it in expected.items]
    code, _, err = run(["predict", "--adapter", str(tmp_path / "run" / "best"), "--data", str(val), "--data-root", str(synth_data),
                        "--out", str(tmp_path / "pv"), "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    code, out, err = run(["evaluate", "--pred", str(tmp_path / "pv" / "probs.csv"), "--data", str(val)], capsys)
    assert code == 0 and f"probs.csv: {len(expected)} questions" in out, (out, err)
    code, _, err = run(["report", "--pred", str(tmp_path / "pv" / "probs.csv"), "--data", str(val), "--data-root", str(synth_data),
                        "--out", str(tmp_path / "val.html")], capsys)
    assert code == 0 and (tmp_path / "val.html").stat().st_size > 0, err


def test_train_has_predicts_model_and_image_flags(capsys) -> None:
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    for flag in ("--dtype", "--image-size", "--image-mode", "--prompt", "--quant", "--device"):
        assert flag in out, flag


def test_ensemble_keeps_equal_weights_when_the_fit_loses_out_of_fold(synth_data: Path, tmp_path: Path, capsys) -> None:
    """Item 7: two members that each know a little, on 24 labelled questions: the fitted weights chase noise and lose
    to equal weights out of fold. weights.json then keeps equal weights (and says what the fit would have been), the
    output says so in one line, and the submission is the equal-weight one."""
    labels = pd.read_csv(synth_data / "test_labels.csv")
    ids, y = labels["id"].tolist(), labels["answer"].map("abcd".index).to_numpy()
    rng = np.random.default_rng(0)
    members = []
    for k in range(2):
        p = rng.dirichlet(np.ones(4), len(ids))
        right = rng.random(len(ids)) < 0.5
        p[right, y[right]] += 0.6
        members.append(probs_csv(tmp_path / f"m{k}" / "probs.csv", ids, p / p.sum(1, keepdims=True)))
    argv = ["ensemble", "-p", str(members[0]), "-p", str(members[1]), "--data", str(synth_data / "test_labels.csv"), "--folds", "3"]
    code, out, err = run([*argv, "--fit-weights", "--out", str(tmp_path / "fit")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "fit" / "weights.json").read_text())
    assert report["kept"] == "equal" and report["weights"] == [0.5, 0.5] and report["fitted"] != [0.5, 0.5]
    assert (report["cv"]["accuracy"], -report["cv"]["nll"]) <= (report["equal"]["accuracy"], -report["equal"]["nll"])
    assert "the fitted weights lose to equal weights out of fold" in out and "weights.json keeps equal weights" in out
    code, _, err = run([*argv, "--out", str(tmp_path / "equal")], capsys)
    assert code == 0, err
    assert (tmp_path / "fit" / "submission.csv").read_text() == (tmp_path / "equal" / "submission.csv").read_text()


def test_progress_in_a_log_is_plain_lines(tiny_model: Path, synth_data: Path, tmp_path: Path, capsys) -> None:
    """Item 9: stderr that is not a terminal (a log file, a pipe, a scheduler) gets whole progress lines: no carriage
    returns, no escape codes, a line at the start and one at the end."""
    code, _, err = run(["predict", "--model", str(tiny_model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "p"),
                        "--device", "cpu", "--set", "model.dtype=fp32", "--set", "image.size=64"], capsys)
    assert code == 0, err
    assert "\r" not in err and "\x1b[" not in err
    n = len(pd.read_csv(synth_data / "test.csv"))
    assert any(line.endswith("q/s]") and "100%" in line and f"{n}/{n}" in line for line in err.splitlines()), err


def test_cpu_quantisation_warning_once_a_process(tiny_model: Path, synth_data: Path, tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    """Item 9: the 'nf4 on CPU is slow' warning once a process, not at every load (K-fold, tuning, a notebook)."""
    import mcvqa.model

    monkeypatch.setitem(mcvqa.model._said, "cpu_quant", False)  # as in a fresh process
    said = []
    for k in range(2):
        caplog.clear()
        code, _, err = run(["predict", "--model", str(tiny_model), "--quant", "nf4", "--data", str(synth_data / "test.csv"),
                            "--out", str(tmp_path / f"p{k}"), "-q", "--device", "cpu", "--set", "image.size=64"], capsys)
        assert code == 0, err
        said.append(sum("weights on CPU are very slow" in r.getMessage() for r in caplog.records))
    assert said == [1, 0]


def test_korean_in_plots_without_a_system_font(tmp_path: Path, monkeypatch) -> None:
    """Item 9: with no Korean font on the system, plots use the NanumGothic that a dependency ships: every Hangul
    glyph is drawn (matplotlib warns 'Glyph ... missing from font(s)' for each box it draws instead)."""
    import warnings

    import matplotlib.pyplot as plt

    from mcvqa import plotting

    monkeypatch.setattr(plotting, "CJK_FONTS", ["No Such Font"])  # as on a machine without one, whatever this one has
    plotting.setup.cache_clear()
    try:
        plotting.setup()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig, ax = plt.subplots()
            ax.set_title("사진 속 물건은 무엇인가요?")
            fig.savefig(tmp_path / "k.png")
            plt.close(fig)
        assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught][:3]
    finally:
        plotting.setup.cache_clear()
