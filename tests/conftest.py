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
