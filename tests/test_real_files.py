"""Proven on the real Qwen/Qwen3-VL-8B-Instruct files (tokenizer, chat template, processor, config; no weights).

The files come from ``MCVQA_TEST_FILES``, else ``../shared/fixtures/qwen3-vl-8b-instruct``, else the Hub; without
them these tests skip with one line (``.ci/run`` sets ``MCVQA_REQUIRE_TEST_FILES=1``, which turns the skip into a
failure). The end-to-end tests run the real CLI on ``mcvqa tiny --like`` of those files: a toy-sized model
with the real vocabulary (151,936 rows), token ids, M-RoPE and processor, on 720x540 JPEG photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli as run



@pytest.fixture(scope="module")
def processor(real_files: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(real_files, local_files_only=True)


# ---------------------------------------------------------------------------------------------- token facts


def test_letter_spellings_are_the_real_ids(processor) -> None:
    from mcvqa.scoring import letter_tokens

    letters = letter_tokens(processor.tokenizer)
    # a b c d = 64-67, " a" 264, "A" 32 ... (FIELD-NOTES): every spelling one token, the bare one trained on.
    assert letters.target == (64, 65, 66, 67)
    assert letters.variants == ((64, 264, 32, 362), (65, 293, 33, 425), (66, 272, 34, 356), (67, 294, 35, 422))


def test_chat_template_frame_is_recovered_from_the_real_template(processor) -> None:
    from mcvqa.prompts import Frame, load_prompt

    system = load_prompt("fewshot_ko").system
    frame = Frame.from_processor(processor, system)
    assert frame.head == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    assert frame.between == ""
    assert frame.tail == "<|im_end|>\n<|im_start|>assistant\n"  # Instruct: no <think> block before the answer
    assert Frame.from_processor(processor, "").head == "<|im_start|>user\n"  # no default system turn
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "질문"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == frame.render("질문")


@pytest.mark.parametrize("prompt", ["fewshot_ko", "plain_ko", "plain_en"])
def test_segments_tokenize_like_the_whole_string(processor, prompt: str) -> None:
    from mcvqa.config import ImageConfig
    from mcvqa.data import Item
    from mcvqa.features import Encoder
    from mcvqa.prompts import load_prompt

    enc = Encoder(processor, load_prompt(prompt), ImageConfig())
    tok = processor.tokenizer
    questions = [
        ("이 사진에서 보이는 탈것은 무엇인가요?", ("세발 오토바이", "오토바이", "자동차", "자전거")),
        ("이 사진에서 볼 수 없는 것은?", ("  빨간 우산 ", "3개", "A4 용지", "🙂 웃는 얼굴")),
        ("What is 12+30?", ("42", " 42", "forty-two", "a. b")),
        ("간판에 적힌 글자는 'CAFE'인가요\t아니면\n'BAR'인가요?", ("CAFE", "BAR", "둘 다", "없음")),
    ]
    n_image = 256
    for q, opts in questions:
        item = Item("x", Path("x.jpg"), q, opts)
        image_text = "<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|>"
        image_ids = tok.encode(image_text, add_special_tokens=False)
        assert len(image_ids) == n_image + 2
        pieces = enc.prefix_ids + image_ids + enc.question_ids(q) + enc.option_ids(opts)
        assert pieces == tok.encode(enc.full_text(item, image_text), add_special_tokens=False), q


def test_prompt_token_counts_under_the_real_tokenizer(processor) -> None:
    from mcvqa.prompts import load_prompt

    assert len(processor.tokenizer.encode(load_prompt("fewshot_ko").system)) == 546  # the local tokenizer says 1,208


def test_visual_tokens_of_a_competition_photo(processor, photo_data: Path) -> None:
    from mcvqa.config import ImageConfig
    from mcvqa.features import Encoder
    from mcvqa.images import load_prepared
    from mcvqa.prompts import load_prompt

    photo = next((photo_data / "test").glob("*.jpg"))
    for cfg, expected in ((ImageConfig(mode="letterbox", size=512), 256), (ImageConfig(mode="native"), None)):
        enc = Encoder(processor, load_prompt("plain_ko"), cfg)
        ids, _, _ = enc.pixels(load_prepared(photo, cfg))
        n = len(ids) - 2
        if expected is not None:
            assert n == expected
        else:
            assert 370 <= n <= 390, n  # a 540x720 photo at native resolution: ~380 (FIELD-NOTES)


def test_tiny_like_keeps_the_real_ids_and_files(real_files: Path, real_tiny: Path) -> None:
    cfg = json.loads((real_tiny / "config.json").read_text())
    real = json.loads((real_files / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "model_type"):
        assert cfg[key] == real[key]
    assert cfg["text_config"]["vocab_size"] == 151936 and cfg["text_config"]["head_dim"] == 128
    assert cfg["text_config"]["rope_parameters"]["mrope_section"] == [24, 20, 20]
    assert cfg["text_config"]["hidden_size"] < 4096 and cfg["vision_config"]["depth"] < 27
    assert cfg["vision_config"]["deepstack_visual_indexes"] and cfg["vision_config"]["patch_size"] == 16
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json", "tokenizer_config.json"):
        assert (real_tiny / name).read_bytes() == (real_files / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- the CLI, end to end


def _predict(capsys, model: Path, data: Path, out: Path, *extra: str) -> pd.DataFrame:
    code, _, err = run(["predict", "--model", str(model), "--data", str(data / "test.csv"), "--out", str(out), "-q", "--batch-size", "4", *extra], capsys)
    assert code == 0, err
    probs = pd.read_csv(out / "probs.csv")
    sub = pd.read_csv(out / "submission.csv")
    test = pd.read_csv(data / "test.csv")
    assert sub["id"].tolist() == test["id"].tolist()
    p = probs[["p_a", "p_b", "p_c", "p_d"]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert (np.array(list("abcd"))[p.argmax(axis=1)] == sub["answer"].to_numpy()).all()
    return probs


def test_cli_predict_every_method_on_the_real_files(real_tiny: Path, photo_data: Path, tmp_path: Path, capsys) -> None:
    plain = _predict(capsys, real_tiny, photo_data, tmp_path / "plain")
    uncached = _predict(capsys, real_tiny, photo_data, tmp_path / "uncached", "--no-prefix-cache")
    # The cached 554-token real system prompt gives the probabilities of the whole sequence.
    np.testing.assert_allclose(plain[["p_a", "p_b", "p_c", "p_d"]], uncached[["p_a", "p_b", "p_c", "p_d"]], atol=1e-5)
    _predict(capsys, real_tiny, photo_data, tmp_path / "gen", "--scoring", "generate", "--set", "predict.max_new_tokens=2")
    # Every other method goes through the same engine (test_engine.py); here the ones that build their own
    # prompts from the real template: shared question prefix with 4 option segments, and image views.
    for tta in ("orders", "views"):
        extra = ["--tta", tta, "--set", "tta.params=norm", "--set", "tta.views=[crop]"]
        _predict(capsys, real_tiny, photo_data, tmp_path / tta, *extra)
    assert (tmp_path / "orders" / "per_order.csv").exists()


@pytest.mark.slow
def test_cli_train_adapter_report_and_serve_on_the_real_files(real_tiny: Path, photo_data: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code, _, err = run(
        ["train", "--model", str(real_tiny), "--data", str(photo_data / "train.csv"), "--out", str(run_dir), "-q",
         "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "lora.r=4", "--set", "train.report_to=[]",
         "--set", "train.gradient_checkpointing=false"],
        capsys,
    )
    assert code == 0, err
    assert (run_dir / "best" / "adapter_model.safetensors").exists()
    with_adapter = ["--adapter", str(run_dir / "best")]
    _predict(capsys, real_tiny, photo_data, tmp_path / "adapted", *with_adapter)
    _predict(capsys, real_tiny, photo_data, tmp_path / "blend", *with_adapter, "--tta", "blend")
    _predict(capsys, real_tiny, photo_data, tmp_path / "tent", *with_adapter, "--tta", "tent")
    code, out, err = run(["report", "--pred", str(tmp_path / "adapted" / "probs.csv"), "--data", str(photo_data / "test_labels.csv"),
                          "--out", str(tmp_path / "report.html")], capsys)
    assert code == 0, err
    assert "accuracy" in (tmp_path / "report.html").read_text(encoding="utf-8")

    from mcvqa.config import load_config
    from mcvqa.data import read_csv
    from mcvqa.serve import Answerer

    cfg = load_config(None, {"model": {"name_or_path": str(real_tiny)}}, env=False, inherit=[real_tiny, run_dir / "best"])
    answerer = Answerer(cfg, adapter=run_dir / "best")
    item = read_csv(photo_data / "test.csv").items[0]
    msg, p = answerer.answer(str(item.image), item.question, list(item.options))
    # The page's answer is predict's answer for the same question.
    row = pd.read_csv(tmp_path / "adapted" / "probs.csv").set_index("id").loc[item.id]
    np.testing.assert_allclose(p, row[["p_a", "p_b", "p_c", "p_d"]].to_numpy(dtype=float), atol=1e-5)
    assert msg.startswith(f"### Answer: **{'abcd'[int(np.argmax(p))]}.")
