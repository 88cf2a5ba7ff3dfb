"""Shared fixtures: one tiny Qwen3-VL and one small synthetic dataset per test session, built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mcvqa.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mcvqa.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("data") / "synth"
    synthesize(out, SynthConfig(train=48, test=24, seed=3))
    return out


@pytest.fixture(scope="session")
def cfg_factory(tiny_model: Path):
    """Config for the tiny model on CPU in fp32, with any extra overrides."""
    from mcvqa.config import load_config

    def make(*sets: str, **kw):
        base = [f"model.name_or_path={tiny_model}", "model.device=cpu", "model.dtype=fp32", "image.size=64"]
        return load_config(None, base + list(sets), env=False, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model: Path, cfg_factory):
    """(model, processor) loaded once through the production path."""
    from mcvqa.model import load_model

    return load_model(cfg_factory().model)


@pytest.fixture()
def encoder(tiny_loaded, cfg_factory):
    from mcvqa.features import Encoder
    from mcvqa.prompts import load_prompt

    cfg = cfg_factory()
    return Encoder(tiny_loaded[1], load_prompt(cfg.prompt.name), cfg.image)


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def make_image(path: Path, size=(64, 48), colour=(200, 30, 30), fmt: str = "JPEG") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``mcvqa ARGV`` in this process: (exit code, stdout, stderr)."""
    from mcvqa.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def cli_in_process(argv: list[str]) -> tuple[int, str]:
    """``mcvqa ARGV`` in this process without pytest's capsys (module fixtures, reference runs): (exit code, stderr).
    Saves a Python start with torch and transformers per call (seconds each on 2 cores) where the test needs no
    separate process (only a process that is killed must be one)."""
    import contextlib
    import io

    from mcvqa.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, err.getvalue()


# ---------------------------------------------------------------------------------------------- real files

REPO = Path(__file__).resolve().parents[1]
REAL_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "config.json", "generation_config.json")
"""The nine non-weight files of Qwen/Qwen3-VL-8B-Instruct the real-file tests need."""


def find_real_files() -> tuple[Path | None, str]:
    """Where the real Qwen3-VL files are: MCVQA_TEST_FILES, else ../shared/fixtures beside the checkout, else
    the Hub when it answers (the nine small files only). (None, why) when none of these has them."""
    env = os.environ.get("MCVQA_TEST_FILES")
    if env:
        path = Path(env).expanduser()
        missing = [f for f in REAL_FILES if not (path / f).is_file()]
        return (path, "") if not missing else (None, f"MCVQA_TEST_FILES={env} lacks {missing[0]}")
    default = REPO.parent / "shared" / "fixtures" / "qwen3-vl-8b-instruct"
    if all((default / f).is_file() for f in REAL_FILES):
        return default, ""
    from mcvqa.model import hub_reachable

    if os.environ.get("HF_HUB_OFFLINE") != "1" and hub_reachable():
        from huggingface_hub import snapshot_download

        return Path(snapshot_download("Qwen/Qwen3-VL-8B-Instruct", allow_patterns=list(REAL_FILES))), ""
    return None, f"real Qwen3-VL files not found (no MCVQA_TEST_FILES, no {default}, Hub unreachable)"


@pytest.fixture(scope="session")
def real_files() -> Path:
    path, why = find_real_files()
    if path is None:
        if os.environ.get("MCVQA_REQUIRE_TEST_FILES") == "1":  # .ci/run: these tests must run, not skip
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def real_tiny(real_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL with the real config's ids and rope, and the real tokenizer and processor."""
    from mcvqa.tiny import build_tiny_like

    return build_tiny_like(real_files, tmp_path_factory.mktemp("models") / "tiny_like")


@pytest.fixture(scope="session")
def photo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The competition's CSV format with 720x540 / 540x720 JPEG photos and Korean questions."""
    from mcvqa.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("data") / "photos"
    synthesize(out, SynthConfig(train=24, test=8, seed=5, size=(720, 540)))
    return out


def assert_vision_like_stock(visual, pixel_values, grid_thw) -> None:
    """A vision tower mcvqa's loader rewired (host grid, one-call attention, patch embedding as a product) gives the
    image and DeepStack features of transformers' own forward: its helpers, its per-image SDPA, its Conv3d (1e-5)."""
    import torch

    from mcvqa.kernels import VISION_ATTENTION

    assert getattr(visual, "reads_host_grid", False) and "forward" in vars(visual.patch_embed)
    attention = visual.config._attn_implementation
    with torch.no_grad():
        fast = visual(pixel_values, grid_thw=grid_thw)
        visual.config._attn_implementation = "sdpa"
        patch_forward = vars(visual.patch_embed).pop("forward")
        try:
            stock = type(visual).forward(visual, pixel_values, grid_thw=grid_thw)
        finally:
            visual.config._attn_implementation = attention
            visual.patch_embed.forward = patch_forward
    assert attention in (VISION_ATTENTION, "sdpa")
    torch.testing.assert_close(fast.pooler_output, stock.pooler_output, atol=1e-5, rtol=0)
    for a, b in zip(getattr(fast, "deepstack_features", None) or [], getattr(stock, "deepstack_features", None) or [], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
