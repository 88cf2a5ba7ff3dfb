"""The command line: user mistakes end in one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image, write_csv, run_cli as run



def test_bad_csv_is_one_line(tmp_path: Path, capsys) -> None:
    make_image(tmp_path / "i.jpg")
    csv = write_csv(tmp_path / "test.csv", "id,path,question,a,b,c,d\nq1,i.jpg,무엇?,가,,다,라\n")
    code, out, err = run(["predict", "--model", str(tmp_path / "nomodel"), "--data", str(csv), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.strip() == f"error: {csv} row 1, column b: option b is empty"
    assert "Traceback" not in err + out


def test_missing_data_file(tmp_path: Path, capsys) -> None:
    code, _, err = run(["predict", "--model", "x", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope.csv: file not found" in err and err.count("\n") == 1


def test_bad_override(tmp_path: Path, capsys) -> None:
    code, _, err = run(["config", "--set", "lora.rank=4"], capsys)
    assert code == 2 and err.strip().startswith("error: unknown field lora.rank")


def test_model_folder_without_safetensors(tmp_path: Path, capsys, synth_data) -> None:
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04")
    code, _, err = run(["predict", "--model", str(bad), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "only pickle weights (pytorch_model.bin); mcvqa loads safetensors only" in err


def test_synth_predict_evaluate(tmp_path: Path, tiny_model: Path, capsys) -> None:
    code, out, _ = run(["synth", "--out", str(tmp_path / "d"), "--train", "8", "--test", "12", "-q"], capsys)
    assert code == 0 and "test_labels" in out
    code, out, err = run(["predict", "--model", str(tiny_model), "--data", str(tmp_path / "d" / "test.csv"), "--out", str(tmp_path / "r"), "-q"], capsys)
    assert code == 0 and "submission" in out and "12 questions" in err
    code, out, _ = run(["evaluate", "--pred", str(tmp_path / "r" / "probs.csv"), "--data", str(tmp_path / "d" / "test_labels.csv")], capsys)
    assert code == 0 and "accuracy" in out and "confusion" in out


def test_config_show_documents_fields(capsys) -> None:
    code, out, _ = run(["config", "--set", "lora.r=8"], capsys)
    assert code == 0 and "r: 8" in out and "# LoRA rank." in out


def test_help_explains_options(capsys) -> None:
    code, out, _ = run(["predict", "--help"], capsys)
    assert code == 0 and "--on-bad-image" in out and "--adapter" in out
    assert "<bool>" not in out and "--no-resume" not in out  # flags take no value; the help must not suggest one


def test_generate_scoring_is_kept_for_comparison(tmp_path: Path, tiny_model: Path, synth_data: Path, capsys) -> None:
    code, _, err = run(
        ["predict", "--model", str(tiny_model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "g"), "--scoring", "generate", "-q"],
        capsys,
    )
    assert code == 0, err
    import json

    summary = json.loads((tmp_path / "g" / "predict_summary.json").read_text())
    # An untrained model rarely emits a parseable letter: the fallback is counted and said, not hidden (a
    # trained model's generate answers are checked in test_known_answers.py).
    assert isinstance(summary["generate_unparsed"], int) and summary["questions"] == 24
    assert (summary["generate_unparsed"] > 0) == ("had no parseable letter" in err)


def test_predict_with_order_averaging_reports_circular_eval(tmp_path: Path, tiny_model: Path, synth_data: Path, capsys) -> None:
    code, _, err = run(["predict", "--model", str(tiny_model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o"), "--tta", "orders,views", "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "per_order.csv").exists()
    code, out, _ = run(["evaluate", "--pred", str(tmp_path / "o" / "probs.csv"), "--data", str(synth_data / "test_labels.csv")], capsys)
    assert code == 0 and "circular" in out


def test_ensemble_command(tmp_path: Path, tiny_model: Path, synth_data: Path, capsys) -> None:
    for name in ("m1", "m2"):
        assert run(["predict", "--model", str(tiny_model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / name), "-q"], capsys)[0] == 0
    code, out, err = run(["ensemble", "-p", str(tmp_path / "m1" / "probs.csv"), "-p", str(tmp_path / "m2" / "probs.csv"), "--weights", "1,3",
                          "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "ens")], capsys)
    assert code == 0, err
    # identical members: the ensemble is the member
    assert (tmp_path / "ens" / "submission.csv").read_bytes() == (tmp_path / "m1" / "submission.csv").read_bytes()


@pytest.mark.parametrize("argv, says", [
    (["predict", "--tta", "pride,orders"], "choose orders or pride"),
    (["predict", "--tta", "tent,views"], "tent adapts on its own"),
    (["train", "--val-data", "v.csv", "--kfold", "3"], "--val-data and --kfold exclude each other"),
])
def test_invalid_combinations_fail_before_any_model_loads(tmp_path: Path, synth_data: Path, capsys, monkeypatch, argv, says) -> None:
    import time

    import mcvqa.model

    monkeypatch.setattr(mcvqa.model, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    t0 = time.perf_counter()
    code, out, err = run([*argv, "--data", str(synth_data / "train.csv"), "--out", str(tmp_path / "o"), "--model", "x"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "o").exists()


_EXIT_SAVES_COVERAGE = """
import os, threading
real_exit = os._exit
def exit_(status):
    (out / "exit").write_text(str(status))
    try:  # under tools/mutate.py: keep what coverage saw
        import coverage
        cov = coverage.Coverage.current()
        if cov is not None:
            if threading.current_thread() is threading.main_thread():
                cov.stop()
            cov.save()
    except ImportError:
        pass
    real_exit(status)
os._exit = exit_
"""

_ENTRY_PROBE = """
import atexit, os, pathlib, runpy, sys, threading, time
out = pathlib.Path(sys.argv[1])
class Teardown:  # its __del__ runs only if the interpreter tears its modules down
    def __del__(self):
        (out / "teardown").write_text("ran")
keep = Teardown()
atexit.register(lambda: (out / "atexit").write_text("ran"))
command_ended = threading.Event()
def late():  # a thread still at work when the command returns (for a minute with MCVQA_PROBE_SLOW_THREAD)
    command_ended.wait()
    if os.environ.get("MCVQA_PROBE_SLOW_THREAD"):
        while threading.main_thread().is_alive():  # the exit's wait for the threads marks the main thread done
            time.sleep(0.01)
        (out / "exit_waits").write_text("yes")
        time.sleep(60)
    else:
        time.sleep(0.2)
    (out / "thread").write_text("ran")
threading.Thread(target=late).start()
import concurrent.futures
pool = concurrent.futures.ThreadPoolExecutor(2)  # idle and never shut down, as torch.compile leaves its compile pool
pool.submit(lambda: None).result()
import mcvqa.cli as cli
command = cli.main
def main(*args):
    try:
        return command(*args)
    finally:
        command_ended.set()
        print("probe: the last line, still in the pipe's buffer")
        (out / "command_ended").write_text("yes")
cli.main = main
""" + _EXIT_SAVES_COVERAGE + """
def watchdog():  # a process that has not ended 20 s on is hanging in its exit: end it, saying so
    time.sleep(20)
    exit_(99)
threading.Thread(target=watchdog, daemon=True).start()
sys.argv = ["mcvqa", *sys.argv[2:]]
runpy.run_module("mcvqa", run_name="__main__", alter_sys=True)  # as `python -m mcvqa`: mcvqa's module is the program
"""


@pytest.mark.parametrize("argv, status", [(["config"], 0), (["predict", "--model", "m", "--data", "missing.csv", "--out", "o"], 2)])
def test_the_command_line_leaves_without_the_interpreters_teardown_and_keeps_what_an_exit_does(tmp_path: Path, argv: list[str], status: int) -> None:
    """``python -m mcvqa`` (and the ``mcvqa`` script) end through ``os._exit``, without Python's teardown (about a
    second after any command that imported torch): an object only module teardown would delete is never deleted.
    What a normal exit does that matters still happens: the exit status is the command's, a thread still at work
    finishes, an idle executor left open does not hold the process forever, atexit handlers run, and what was printed
    to a pipe (block-buffered there) arrives."""
    import subprocess
    import sys

    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's output block-buffered, as a user's
    done = subprocess.run([sys.executable, "-c", _ENTRY_PROBE, str(tmp_path), *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == status, done.stderr
    assert (tmp_path / "exit").read_text() == str(status)
    assert not (tmp_path / "teardown").exists()
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "ran"
    assert done.stdout.rstrip().splitlines()[-1] == "probe: the last line, still in the pipe's buffer"
    if status:
        assert done.stderr.startswith("error: missing.csv: file not found")
    else:
        assert "model:" in done.stdout


def test_ctrl_c_while_the_exit_waits_for_a_thread_ends_it_in_one_line_with_the_commands_status(tmp_path: Path) -> None:
    """Ctrl-C while the exit waits for a slow thread the command left behind: the wait stops at once, one line says
    the outputs were written (no traceback), the atexit handlers still run and the status is the command's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "MCVQA_PROBE_SLOW_THREAD": "1"}
    # Ctrl-C's default in the child, as in a terminal: a test run started in the background of a script inherits
    # SIGINT ignored, and a Python started so keeps ignoring it.
    child = subprocess.Popen([sys.executable, "-c", _ENTRY_PROBE, str(tmp_path), "config"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while not (tmp_path / "exit_waits").exists() and time.monotonic() < deadline:  # the exit is waiting for the thread
        time.sleep(0.05)
    assert (tmp_path / "command_ended").exists()
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert (tmp_path / "exit").read_text() == "0"  # through the fast exit, not the watchdog's 99
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C) while waiting for a background thread"), err
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "thread").exists()
    assert out.rstrip().splitlines()[-1] == "probe: the last line, still in the pipe's buffer"


_HOST = """
import runpy, sys
sys.argv = ["mcvqa", "config"]
try:
    runpy.run_module("mcvqa", run_name="__main__")  # mcvqa run inside a program of its own, in its own namespace
except SystemExit as e:
    print("the host goes on; status", e.code)
"""


def test_a_program_beneath_the_command_gets_control_back(tmp_path: Path) -> None:
    """The fast exit is for the process mcvqa owns: a profiler writes its output after the command
    (``python -m cProfile -o F -m mcvqa``), and a program that runs mcvqa's module in its own namespace catches the
    ``SystemExit`` and goes on, as they would with any Python program."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    prof = tmp_path / "mcvqa.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "mcvqa", "config"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "model:" in done.stdout, done.stderr
    assert prof.stat().st_size > 0
    prof.unlink()  # run() called from __main__'s own namespace, under cProfile.run: the profiler alone says not to
    code = f"import cProfile, sys; from mcvqa.cli import run; sys.argv = ['mcvqa', 'config']; cProfile.run('run()', {str(prof)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "model:" in done.stdout, done.stderr
    assert prof.stat().st_size > 0
    done = subprocess.run([sys.executable, "-c", _HOST], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "model:" in done.stdout, done.stderr
    assert done.stdout.rstrip().splitlines()[-1] == "the host goes on; status 0"


_LEAVE_PROBE = """
import ctypes, pathlib, runpy, sys
out, how = pathlib.Path(sys.argv[1]), sys.argv[2]
""" + _EXIT_SAVES_COVERAGE + """
import atexit
try:  # under tools/mutate.py: coverage saved at os._exit only, so it sees the exit's lines after the atexit handlers
    import coverage
    if coverage.Coverage.current() is not None:
        atexit.unregister(coverage.Coverage.current()._atexit)
except (ImportError, AttributeError):
    pass
import mcvqa.cli as cli
class Held:  # held by the failed command's frame: freed, it says so
    def __del__(self):
        (out / "released").write_text("yes")
def main():
    held = Held()
    ctypes.CDLL(None).printf(b"probe: printed by C, in its stdio buffer\\n")
    print("probe: printed by Python, in its buffer")
    if how == "fail":
        try:
            raise ValueError("the command's own failure")
        except ValueError:
            raise SystemExit(2) from None
cli.main = main
sys.argv = ["mcvqa"]
runpy.run_module("mcvqa", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("how", ["fail", "ok"])
def test_the_fast_exit_flushes_cs_buffers_and_lets_a_failed_commands_objects_go(tmp_path: Path, how: str) -> None:
    """What ``exit()`` does and ``os._exit`` would not: C's stdio buffers flushed (an extension's printf into a pipe);
    and what Python's exit does first: the failed command's exception let go, so an object its frames held is freed
    (whatever closes or saves itself when freed still does) before the process ends."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", _LEAVE_PROBE, str(tmp_path), how], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == (2 if how == "fail" else 0), done.stderr
    assert "probe: printed by C, in its stdio buffer" in done.stdout and "probe: printed by Python, in its buffer" in done.stdout
    assert (tmp_path / "released").read_text() == "yes"


def test_output_that_cannot_be_written_is_said_and_fails_the_command(tmp_path: Path) -> None:
    """A command's last output that cannot be written at the exit (stdout on a full disk) is said in one line and
    gives status 120, as Python's own exit does, not 0: a script checking the status sees it."""
    import os
    import subprocess
    import sys

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", _LEAVE_PROBE, str(tmp_path), "ok"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 120, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: the command's output could not be written (No space left on device")


def test_the_installed_script_and_python_m_enter_through_run() -> None:
    """Both ways in take the same exit (``run``); ``main`` stays the in-process entry tests and notebooks call."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mcvqa": "mcvqa.cli:run"}
    assert (root / "src" / "mcvqa" / "__main__.py").read_text().rstrip().endswith("from mcvqa.cli import run\n\nrun()")
