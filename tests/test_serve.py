"""mcvqa serve in a real browser: headless Chromium uploads an image, asks, and sees the answer and the chart."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_answerer_messages(cfg_factory, tiny_loaded, synth_data, tmp_path) -> None:
    """Bad uploads get a message, not an exception (no browser needed)."""
    from mcvqa.data import read_csv
    from mcvqa.serve import Answerer, bar_chart

    answerer = Answerer.__new__(Answerer)
    answerer.cfg = cfg_factory()
    from mcvqa.predict import build_scorer

    answerer.scorer = build_scorer(answerer.cfg, model=tiny_loaded[0], processor=tiny_loaded[1])
    it = read_csv(synth_data / "test.csv").items[0]
    msg, p = answerer.answer(str(it.image), it.question, list(it.options))
    assert msg.startswith("### Answer:") and p is not None and abs(p.sum() - 1) < 1e-6
    assert answerer.answer(None, "q", ["a", "b", "c", "d"])[0] == "**Please upload an image.**"
    (tmp_path / "fake.png").write_text("not an image")
    msg, p = answerer.answer(str(tmp_path / "fake.png"), "q", ["a", "b", "c", "d"])
    assert p is None and "cannot be used as an image" in msg
    assert "Option b is empty" in answerer.answer(str(it.image), "q", ["a", "", "c", "d"])[0]
    assert bar_chart(np.array([0.1, 0.6, 0.2, 0.1]), list("abcd")) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
def test_page_in_headless_chromium(tiny_model: Path, synth_data: Path) -> None:
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'mcvqa[serve]')")
    pytest.importorskip("playwright", reason="playwright not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    from mcvqa.data import read_csv

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mcvqa", "serve", "--model", str(tiny_model), "--device", "cpu", "--port", str(port), "--examples", str(synth_data / "test_labels.csv")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail("server exited: " + server.stdout.read().decode(errors="replace")[-2000:])
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        it = read_csv(synth_data / "test.csv").items[0]
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#submit", timeout=60_000)
            # A bad request first: no image.
            page.click("#submit")
            page.wait_for_selector("#answer :text('Please upload an image')", timeout=60_000)
            page.set_input_files("#image input[type=file]", str(it.image))
            page.wait_for_selector("#image img", timeout=60_000)
            page.fill("#question textarea", it.question)
            for letter, text in zip("abcd", it.options):
                page.fill(f"#option_{letter} textarea", text)
            page.click("#submit")
            page.wait_for_selector("#answer :text('Answer:')", timeout=60_000)
            page.wait_for_selector("#chart img, #chart svg, #chart canvas", timeout=60_000)
            answer = page.inner_text("#answer")
            assert any(f"{l}. {o}" in answer for l, o in zip("abcd", it.options))
            page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
            browser.close()
        assert (ARTIFACTS / "serve.png").stat().st_size > 10_000
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
