"""The reference's own stack (issue 25): pre-quantised checkpoints, ``mcvqa quantize``, fp16 training with loss
scaling, and the supported transformers range (``make test-oldest`` runs the core suite on its low end)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'mcvqa[gpu]')")

PROBS = ["p_a", "p_b", "p_c", "p_d"]


@pytest.fixture(scope="module")
def prequantised(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as ``save_pretrained`` writes it after a bitsandbytes 4-bit load (what Unsloth's ``*-bnb-4bit``
    checkpoints are): its config.json carries the quantization_config, its weights are packed 4-bit tensors."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("models") / "tiny_bnb4"
    qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["model.visual", "visual", "lm_head"])
    # Saved in bf16, as a GPU run saves it: loading it in fp32 on CPU is the case that used to fail.
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.bfloat16, quantization_config=qconf, device_map={"": "cpu"})
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_model).save_pretrained(out)
    (out / "mcvqa.yaml").write_text((tiny_model / "mcvqa.yaml").read_text())
    return out


def _probs(run: Path):
    return pd.read_csv(run / "probs.csv")[PROBS].to_numpy()


def test_prequantised_folder_through_predict_and_train(prequantised: Path, synth_data: Path, tmp_path: Path, capsys, caplog) -> None:
    code, _, err = run_cli(["predict", "--model", str(prequantised), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "p"), "-q"], capsys)
    assert code == 0, err
    assert "saved already quantised (nf4); loaded as it is" in caplog.text  # the CLI prints warnings on stderr
    caplog.clear()
    # --quant nf4 on top: accepted, said, never quantised twice (same probabilities)
    code, _, err = run_cli(["predict", "--model", str(prequantised), "--quant", "nf4", "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "p4"), "-q"], capsys)
    assert code == 0, err
    assert "loaded as it is" in caplog.text
    assert (_probs(tmp_path / "p") == _probs(tmp_path / "p4")).all()
    # --quant int8 asks for something else: the checkpoint's own quantisation wins, said in one line
    from mcvqa.config import ModelConfig
    from mcvqa.model import load_model

    cfg = ModelConfig(name_or_path=str(prequantised), quant="int8", device="cpu")
    model, _ = load_model(cfg)
    assert "its own quantisation is used, not --quant int8" in caplog.text
    assert cfg.quant == "nf4", "the config records what ran"
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    run = tmp_path / "t"
    code, _, err = run_cli(["train", "--model", str(prequantised), "--data", str(synth_data / "train.csv"), "--out", str(run), "-q",
                            "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "prompt.name=plain_ko", "--set", "train.report_to=[]"], capsys)
    assert code == 0, err
    saved = json.loads((run / "best" / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]).name == prequantised.name
    code, _, err = run_cli(["predict", "--adapter", str(run / "best"), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "pa"), "-q"], capsys)
    assert code == 0, err


def test_prequantised_weights_compute_in_the_run_dtype(prequantised: Path) -> None:
    """Saved from bf16 with compute dtype float32 (a CPU save); loaded in fp32 here every weight and every 4-bit
    layer's compute dtype follow the run, so nothing mixes dtypes in the vision tower's convolution."""
    from mcvqa.config import ModelConfig
    from mcvqa.model import load_model

    model, _ = load_model(ModelConfig(name_or_path=str(prequantised), dtype="bf16", device="cpu"))
    four = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert four and all(m.compute_dtype == torch.bfloat16 for m in four)
    floats = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    assert floats == {torch.bfloat16}


def test_quantize_round_trip(tiny_model: Path, synth_data: Path, tmp_path: Path, capsys) -> None:
    """``mcvqa quantize`` writes a folder that loads as it is and scores exactly like quantising at load."""
    q = tmp_path / "q"
    code, out, err = run_cli(["quantize", "--model", str(tiny_model), "--quant", "nf4", "--out", str(q), "--device", "cpu", "--dtype", "fp32"], capsys)
    assert code == 0, err
    config = json.loads((q / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert not list(q.glob("*.index.json")) or all((q / s).exists() for s in json.loads(next(q.glob("*.index.json")).read_text())["weight_map"].values())
    for f in ("tokenizer.json", "chat_template.jinja", "mcvqa.yaml"):
        assert (q / f).is_file(), f
    assert "size: 64" in (q / "mcvqa.yaml").read_text(), "the source's image settings travel"
    assert load_file(str(next(q.glob("*.safetensors"))))  # packed 4-bit tensors, readable
    test = str(synth_data / "test.csv")
    assert run_cli(["predict", "--model", str(q), "--data", test, "--out", str(tmp_path / "pq"), "-q"], capsys)[0] == 0
    assert run_cli(["predict", "--model", str(tiny_model), "--quant", "nf4", "--data", test, "--out", str(tmp_path / "pl"), "-q"], capsys)[0] == 0
    assert (_probs(tmp_path / "pq") == _probs(tmp_path / "pl")).all()
    # refused in one line: an --out that exists, a source that is quantised already
    code, _, err = run_cli(["quantize", "--model", str(tiny_model), "--out", str(q)], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["quantize", "--model", str(q), "--out", str(tmp_path / "q2")], capsys)
    assert code == 2 and "saved already quantised" in err and not (tmp_path / "q2").exists()


def test_fp16_training_keeps_a_tiny_loss_gradient(cfg_factory, synth_data: Path, tmp_path: Path, monkeypatch) -> None:
    """fp16 activations flush gradients below ~6e-8 to zero. With a loss a million times smaller than usual, an
    unscaled fp16 step leaves every LoRA B at its zero init; with loss scaling every B moves. LoRA weights stay fp32,
    and the scaler's state is checkpointed (a resumed fp16 run continues with the same scale)."""
    from mcvqa import train as T
    from mcvqa.data import read_csv

    forward = T.AnswerLoss.forward
    monkeypatch.setattr(T.AnswerLoss, "forward", lambda self, batch: (lambda loss, logits: (loss * 1e-6, logits))(*forward(self, batch)))
    cfg = cfg_factory("model.dtype=fp16", "train.epochs=1", "train.batch_size=4", "train.grad_accum=1", "train.max_steps=3",
                      "train.eval_every=never", "prompt.name=plain_ko", "train.report_to=[]", "lora.r=4")
    T.train_split(cfg, read_csv(synth_data / "train.csv", require_answer=True), [], tmp_path / "r", progress=False, log_fn=lambda *_: None)
    weights = load_file(str(tmp_path / "r" / "last" / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert b and all(bool(w.abs().sum() > 0) for w in b), "every LoRA B moved"
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = json.loads(next((tmp_path / "r" / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["scaler"]["scale"] >= 1.0


def test_fp16_refuses_fp16_trainable_weights(cfg_factory, synth_data: Path, tmp_path: Path) -> None:
    from mcvqa.data import read_csv
    from mcvqa.errors import McvqaError
    from mcvqa.train import train_split

    cfg = cfg_factory("model.dtype=fp16", "train.method=full", "train.epochs=1", "train.batch_size=4", "train.eval_every=never", "train.report_to=[]")
    with pytest.raises(McvqaError, match="fp16 training needs fp32 trainable weights"):
        train_split(cfg, read_csv(synth_data / "train.csv", require_answer=True), [], tmp_path / "r", progress=False, log_fn=lambda *_: None)


def test_a_family_newer_than_the_installed_transformers_is_one_line(tiny_model: Path, synth_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from mcvqa import compat

    monkeypatch.setitem(compat.FAMILY_MIN_TRANSFORMERS, "qwen3_vl", "99.0.0")
    code, _, err = run_cli(["predict", "--model", str(tiny_model), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "p"), "-q"], capsys)
    assert code == 2
    assert "qwen3_vl needs transformers >= 99.0.0" in err and "pip install 'transformers>=99.0.0'" in err


def test_the_supported_range_is_said_once_everywhere() -> None:
    """pyproject's range, compat's constants and the Makefile's oldest run name the same versions."""
    from mcvqa import compat

    pyproject = (REPO / "pyproject.toml").read_text()
    low, high = re.search(r'"transformers>=([\d.]+),<=([\d.]+)"', pyproject).groups()
    assert (low, high) == (compat.TRANSFORMERS_MIN, compat.TRANSFORMERS_TESTED)
    assert re.search(r"^TRANSFORMERS_OLDEST\s*\?=\s*([\d.]+)", (REPO / "Makefile").read_text(), re.M).group(1) == low
    assert re.search(r'^unsloth = \["unsloth>=', pyproject, re.M), "the [unsloth] extra"
    assert compat.version_tuple(low) <= compat.version_tuple(compat.transformers_version()) <= compat.version_tuple(high)
