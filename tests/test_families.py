"""Every first-class family, built tiny from its real checkpoint files (tokenizer, chat template, processor, config):
the fast paths equal the model's own full-sequence forward, the shared-prefix training step equals the plain step,
and the CLI runs tiny -> train -> predict --adapter -> evaluate.

The real files come from ``../shared/fixtures/families.tar.xz`` (or ``MCVQA_FIXTURES``); without them these tests
skip with one line saying so.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

FIXTURES = Path(os.environ.get("MCVQA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
FAMILIES = {
    # id: (checkpoint folder in families.tar.xz, or "arch:X" for `mcvqa tiny --arch X` built with no files; family name)
    "qwen3_5": ("Qwen3.5-9B", "qwen3_5"),
    "gemma4_31b": ("gemma-4-31B-it", "gemma4"),
    "internvl": ("InternVL3_5-8B-HF", "internvl"),
    "local_qwen2_5_vl": ("arch:qwen2_5_vl", "qwen_vl"),
    "local_qwen3_5": ("arch:qwen3_5", "qwen3_5"),
    "local_internvl": ("arch:internvl", "internvl"),
    "local_llava_onevision": ("arch:llava_onevision", "llava_onevision"),
    "local_gemma4": ("arch:gemma4", "gemma4"),
}
PROMPT = """\
name: test_system
system: |
  당신은 사진을 보고 객관식 질문에 답하는 도우미입니다. 먼저 사진을 관찰하고, 선택지를 비교한 뒤, 정답 글자 하나만 답하세요.
question_template: "질문: {question}\\n"
options_header: "선택지:\\n"
option_template: "{letter}. {text}\\n"
instruction: "정답 글자 하나로 답하세요."
"""


@pytest.fixture(scope="session")
def family_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = FIXTURES / "families.tar.xz"
    if not archive.is_file():
        why = f"{archive} not found: the family checkpoints' non-weight files are needed (set MCVQA_FIXTURES)"
        if os.environ.get("MCVQA_REQUIRE_TEST_FILES") == "1":  # .ci/run: these tests must run, not skip
            pytest.fail(why)
        pytest.skip(why)
    out = tmp_path_factory.mktemp("families")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out / "families"


@pytest.fixture(scope="session")
def family_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Tiny models built through the CLI once per session, on demand: ``mcvqa tiny --like`` the real files, or
    ``mcvqa tiny --arch`` with nothing but this repository."""
    root = tmp_path_factory.mktemp("family_models")
    built: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in built:
            from mcvqa.cli import main

            source = FAMILIES[key][0]
            if source.startswith("arch:"):
                argv = ["--arch", source[5:]]
            else:
                argv = ["--like", str(request.getfixturevalue("family_files") / source)]
            with pytest.raises(SystemExit) as e:
                main(["tiny", *argv, "--out", str(root / key)])
            assert e.value.code == 0
            built[key] = root / key
        return built[key]

    return get


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompt") / "test_system.yaml"
    path.write_text(PROMPT, encoding="utf-8")
    return path


def _load(path: Path):
    from mcvqa.config import ModelConfig
    from mcvqa.model import load_model

    return load_model(ModelConfig(name_or_path=str(path), device="cpu", dtype="fp32"))


def _make_sensitive(model) -> None:
    """Random tiny weights hide two things a test must see: a linear-attention layer forgets the prefix within a few
    tokens (its decay), and letter logits near 0 make Gemma's soft cap (tanh(x / 30) * 30) the identity. Slow the
    decay and tighten the cap, in the model itself, so both matter to the probabilities compared."""
    for module in model.modules():
        if hasattr(module, "A_log"):  # gated DeltaNet: decay exp(-exp(A_log) * softplus(.)) close to 1
            module.A_log.data.fill_(-6.0)
    text = model.config.get_text_config()
    if getattr(text, "final_logit_softcapping", None):
        text.final_logit_softcapping = 0.05


def _items_and_images(n: int = 3):
    from PIL import Image

    from mcvqa.data import Item

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256 - 32 * i, 3), dtype=np.uint8)).convert("RGB") for i in range(n)]
    items = [Item(f"q{i}", Path("x.jpg"), "사진 속 물건은 무엇인가요? " * (i + 1), ("사과", "배 두 개", "포도 한 송이", "감")) for i in range(n)]
    return items, images


@pytest.mark.parametrize("key", [k for k in FAMILIES if k != "gemma4_31b"])  # its template: test_gemma4_31b_answers_after_the_thought_channel
# (Gemma 4's E4B features, per-layer inputs and shared keys/values, are in the local build; its real files cost 12 s)
def test_fast_paths_equal_the_models_own_forward(family_models, prompt_file, key, monkeypatch) -> None:
    """Cached prefix, whole sequence, packed rows and option orders in one pass all give the probabilities the
    model's own forward gives on the processor's tokenization of the whole conversation (fp32, 1e-5); so do the fused
    kernels' wiring (``model.kernels``) and the cached prefix after it."""
    from mcvqa import families
    from mcvqa.config import ImageConfig
    from mcvqa.features import Encoder, cyclic_orders
    from mcvqa.images import letterbox
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import Scorer, answer_hidden, compute_prefix, letter_logprobs, packed_answer_hidden

    model, processor = _load(family_models(key))
    _make_sensitive(model)
    family = families.for_model(model)
    assert family.name == FAMILIES[key][1] and family.first_class
    core = family.core_and_head(model)[0]
    visual = getattr(core, "visual", None)
    assert getattr(visual, "reads_host_grid", False) == type(core).__name__.startswith(("Qwen3VL", "Qwen3_5"))
    if getattr(visual, "reads_host_grid", False):  # Qwen3.5's tower is Qwen3-VL's, rewired the same way
        from PIL import Image

        from conftest import assert_vision_like_stock

        px = processor.image_processor(images=[Image.new("RGB", (64, 64), (90, 20, 200)), Image.effect_noise((96, 64), 40).convert("RGB")], return_tensors="pt")
        assert_vision_like_stock(visual, px["pixel_values"], px["image_grid_thw"])
    if not key.startswith("local_"):  # the processor alone tells the family too (an Encoder built without the model)
        assert families.for_processor(processor).name == family.name
    fla_states = _hold_to_the_fla_kernels_contract(family, core, monkeypatch) if family.name == "qwen3_5" else None
    enc = Encoder(processor, load_prompt(str(prompt_file)), ImageConfig(mode="letterbox", size=256), family)
    assert len(enc.prefix_ids) > 40  # the system prompt is really cached
    if family.name == "qwen3_5":  # thinking switched off the template's way: the answer comes after a closed block
        assert enc.frame.tail.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    items, raw = _items_and_images(2)
    images = [letterbox(im, 256) for im in raw]
    scorer = Scorer(model, enc, keep_rows=True)  # predict's scorer: the prefix kept laid out per row (PrefixRows)
    letters = scorer.letters
    reference = []
    for it, im in zip(items, images):
        inputs = processor(text=[enc.full_text(it)], images=[im], return_tensors="pt", add_special_tokens=False)
        # Segments tokenized apart == the processor on the whole rendered conversation.
        assert inputs["input_ids"][0].tolist() == enc.prefix_ids + enc.encode(it, image=im).suffix_ids
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        reference.append(letter_logprobs(logits[:, letters.all_ids], letters)[0])
    reference = torch.stack(reference).exp()
    exs = [enc.encode(it, image=im) for it, im in zip(items, images)]
    with torch.no_grad():
        cached = scorer.logprobs(enc.collate(exs)).exp()
        plain = Scorer(model, enc, prefix_cache=False).logprobs(enc.collate(exs, with_prefix=True)).exp()
        hidden = packed_answer_hidden(model, enc.collate(exs), enc.prefix_ids)
        packed = letter_logprobs(family.head_logits(scorer.head, hidden, letters.all_ids), letters).exp()
        prefix = compute_prefix(model, enc.prefix_ids)
        again = letter_logprobs(family.head_logits(scorer.head, answer_hidden(model, enc.collate(exs), prefix), letters.all_ids), letters).exp()
        orders = scorer.logprobs_orders([enc.encode_orders(it, cyclic_orders(4), image=im) for it, im in zip(items, images)]).exp()
    if fla_states is not None:  # the batch-2 forwards read the prefix's state, one dense row each
        assert any(shape[0] == 2 for shape in fla_states), fla_states
    assert any(k is not None for k in scorer.prefix().rows.keys)
    for name, got in (("cached", cached), ("whole sequence", plain), ("packed", packed), ("prefix recomputed", again)):
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0, msg=f"{key} {name}")
    torch.testing.assert_close(orders[:, 0], reference, atol=1e-5, rtol=0, msg=f"{key} orders, identity order")
    from mcvqa.data import Item

    it, im = items[1], images[1]  # the longer question (the other row of the batch is padded)
    for v, order in enumerate(cyclic_orders(4)):  # order v: the permuted question scored alone
        shown = Item(it.id, it.image, it.question, tuple(it.options[k] for k in order))
        with torch.no_grad():
            alone = scorer.logprobs(enc.collate([enc.encode(shown, image=im)]))[0].exp()
        torch.testing.assert_close(orders[1, v, list(order)], alone, atol=1e-5, rtol=0, msg=f"{key} order {v}")
    _fused_wiring_is_exact(model, family, scorer, enc.collate(exs), reference, key, monkeypatch)


def _hold_to_the_fla_kernels_contract(family, core, monkeypatch) -> list[tuple[int, ...]]:
    """flash-linear-attention's gated delta rule (what transformers runs on a GPU when ``fla`` is installed) reads
    ``initial_state`` as a dense (B, H, K, V) block. The cached prefix's state is batch 1: handed over as it is (or
    expanded, stride 0), the kernel read past it on the H100, an illegal memory access, whenever more than one
    question shared a forward. The torch fallback this machine runs broadcasts instead, so hold it to the kernel's
    contract; returns the shapes of the states it was handed."""
    import sys

    linear = next(layer.linear_attn for layer in family.decoder_layers(core) if hasattr(layer, "linear_attn"))
    namespace = sys.modules[type(linear).__module__]
    rule = namespace.torch_chunk_gated_delta_rule
    states: list[tuple[int, ...]] = []

    def as_fla_reads_it(query, *args, initial_state=None, **kwargs):
        if initial_state is not None:
            assert initial_state.shape[0] == query.shape[0] and initial_state.is_contiguous(), (tuple(query.shape), initial_state.shape, initial_state.stride())
            states.append(tuple(initial_state.shape))
        return rule(query, *args, initial_state=initial_state, **kwargs)

    monkeypatch.setattr(namespace, "torch_chunk_gated_delta_rule", as_fla_reads_it)
    return states


def _fused_wiring_is_exact(model, family, scorer, batch, reference, key, monkeypatch) -> None:
    """``model.kernels`` through the loader's own function, with transformers' arithmetic restated (TORCH_OPS) in
    place of Liger's GPU kernels: the modules it reroutes, the norm's offset, gate and up, RoPE's rotation are the
    family's, so the probabilities stay the model's own."""
    import sys

    from mcvqa import kernels
    from mcvqa.config import ModelConfig
    from mcvqa.model import fuse_kernels

    core = family.core_and_head(model)[0]
    attn = next((layer.self_attn for layer in family.decoder_layers(core) if hasattr(layer, "self_attn")), None)
    namespace = sys.modules[type(attn).__module__]
    if hasattr(namespace, "apply_rotary_pos_emb"):  # the swap is process-wide: undone after the test
        monkeypatch.setattr(namespace, "apply_rotary_pos_emb", namespace.apply_rotary_pos_emb)
    visual = getattr(core, "visual", None)
    vision = sys.modules[type(visual.blocks[0].attn).__module__] if visual is not None else None
    if hasattr(vision, "apply_rotary_pos_emb_vision"):
        monkeypatch.setattr(vision, "apply_rotary_pos_emb_vision", vision.apply_rotary_pos_emb_vision)
    fused = fuse_kernels(model, ModelConfig(kernels="liger", device="cpu"), family, ops=kernels.TORCH_OPS)
    if family.rms_norm_offset is None:
        assert fused == {}, key
        return
    layers = len(family.decoder_layers(core))
    assert fused["rms_norm"] > layers and fused["swiglu"] == layers, (key, fused)
    assert fused["rope"] == (sum(hasattr(l, "self_attn") for l in family.decoder_layers(core)) if family.fused_rope else 0), (key, fused)
    # Qwen-VL towers (Qwen2/2.5/3-VL, and Qwen3.5, whose tower is Qwen3-VL's): 2-D RoPE fused too; the others have none.
    assert fused.get("vision_rope", 0) == (len(visual.blocks) if family.name in ("qwen_vl", "qwen3_5") else 0), (key, fused)
    scorer.invalidate()
    with torch.no_grad():
        got = scorer.logprobs(batch).exp()
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0, msg=f"{key} fused kernels")


@pytest.mark.parametrize("key", ["local_qwen3_5", "local_internvl", "local_gemma4", "local_llava_onevision"])
def test_shared_prefix_training_step_equals_plain_step(family_models, prompt_file, key) -> None:
    """Loss and every LoRA gradient match between the prefix-once steps (cached, packed) and the whole-sequence step."""
    from mcvqa import families
    from mcvqa.config import ImageConfig, LoraConfig
    from mcvqa.features import Encoder
    from mcvqa.images import letterbox
    from mcvqa.model import attach_lora
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import letter_tokens
    from mcvqa.train import AnswerLoss

    base, processor = _load(family_models(key))
    model = attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    family = families.for_model(model)
    targets = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    linear = {"in_proj_qkv", "in_proj_z", "out_proj"} if family.name == "qwen3_5" else set()  # gated DeltaNet's projections
    assert targets >= {"q_proj", "v_proj", "down_proj"} | linear, targets
    assert all(".language_model." in n for n, p in model.named_parameters() if p.requires_grad)  # never the vision tower
    torch.manual_seed(1)
    for n, p in model.named_parameters():  # LoRA B starts at zero: make every adapter matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    enc = Encoder(processor, load_prompt(str(prompt_file)), ImageConfig(mode="letterbox", size=256), family)
    items, raw = _items_and_images()
    exs = [enc.encode(it, image=letterbox(im, 256)) for it, im in zip(items, raw)]
    for ex, label in zip(exs, (0, 2, 3)):
        ex.label = label
    target = letter_tokens(processor.tokenizer).target
    results = {}
    for shared in ("off", "cache", "packed"):
        model.zero_grad(set_to_none=True)
        loss, _ = AnswerLoss(model, enc.prefix_ids, target, shared_prefix=shared)(enc.collate(exs, with_prefix=shared == "off"))
        loss.backward()
        results[shared] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    loss0, grads0 = results["off"]
    assert len(grads0) > 0 and any(g.abs().sum() > 0 for g in grads0.values())
    for shared in ("cache", "packed"):
        loss, grads = results[shared]
        torch.testing.assert_close(loss, loss0, atol=1e-5, rtol=0, msg=f"{key} {shared} loss")
        assert grads.keys() == grads0.keys()
        for n in grads:
            scale = max(1.0, grads0[n].abs().max().item())  # fp32 rounding grows with the gradient's size
            torch.testing.assert_close(grads[n], grads0[n], atol=1e-5 * scale, rtol=1e-4, msg=f"{key} {shared} {n}")


@pytest.mark.parametrize("key", [k for k in FAMILIES if k.startswith("local_")])
def test_cli_tiny_train_predict_evaluate(family_models, synth_data, tmp_path, capsys, key) -> None:
    """The user's path for each family, through the CLI: ``mcvqa tiny --arch X`` (the fixture), train a LoRA adapter,
    predict with it, evaluate. (The real-file models are proven exact above; their CLI path is this same code.)"""
    model = family_models(key)
    csvs = {}
    for name, source, n in (("train", "train.csv", 12), ("test", "test_labels.csv", 6)):
        lines = (synth_data / source).read_text(encoding="utf-8").splitlines()
        csvs[name] = synth_data / f"family_{key}_{name}.csv"  # beside the images: paths are relative to the CSV
        csvs[name].write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    common = ["--device", "cpu", "-q"]
    code, _, err = run_cli(["train", "--data", str(csvs["train"]), "--out", str(tmp_path / "run"), "--model", str(model),
                            "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "lora.r=4", "--set", "data.val_fraction=0.25",
                            "--set", "model.dtype=fp32", "--set", "prompt.name=plain_ko", *common], capsys)  # the cached system prompt is proven exact above
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] >= 2 and np.isfinite(metrics["losses"][-1][1])
    code, _, err = run_cli(["predict", "--adapter", str(tmp_path / "run" / "best"), "--data", str(csvs["test"]),
                            "--out", str(tmp_path / "pred"), *common], capsys)
    assert code == 0, err
    probs = np.loadtxt(tmp_path / "pred" / "probs.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    assert probs.shape == (6, 4) and np.allclose(probs.sum(1), 1, atol=1e-4)
    code, out, err = run_cli(["evaluate", "--pred", str(tmp_path / "pred" / "probs.csv"), "--data", str(csvs["test"])], capsys)
    assert code == 0 and "accuracy" in out.lower(), err


def test_three_family_ensemble_with_fitted_weights(family_models, synth_data, tmp_path, capsys) -> None:
    """Qwen3.5 + Gemma 4 + InternVL, each predicted through the CLI, combined with cross-validated fitted weights."""
    lines = (synth_data / "test_labels.csv").read_text(encoding="utf-8").splitlines()
    val = synth_data / "family_ensemble_val.csv"
    val.write_text("\n".join(lines[:13]) + "\n", encoding="utf-8")
    probs = []
    for key in ("local_qwen3_5", "local_gemma4", "local_internvl"):
        out = tmp_path / key
        code, _, err = run_cli(["predict", "--model", str(family_models(key)), "--data", str(val), "--out", str(out), "--device", "cpu", "-q",
                                "--prompt", "plain_ko", "--set", "model.dtype=fp32"], capsys)
        assert code == 0, err
        probs += ["--probs", str(out / "probs.csv")]
    code, out, err = run_cli(["ensemble", *probs, "--fit-weights", "--data", str(val), "--folds", "3", "--out", str(tmp_path / "ens")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "ens" / "weights.json").read_text())
    assert report["names"] == ["local_qwen3_5", "local_gemma4", "local_internvl"] and report["n"] == 12
    assert abs(sum(report["weights"]) - 1) < 1e-6 and len(report["fold_weights"]) == 3
    for name in report["names"]:
        assert name in out and 0 <= report["members"][name]["accuracy"] <= 1
    assert "3-fold CV" in out and f"disagree on {report['disagreements']} of 12" in out
    # The fitted weights apply to another set through --weights weights.json: the same combination, recomputed.
    code, _, err = run_cli(["ensemble", *probs, "--weights", str(tmp_path / "ens" / "weights.json"), "--out", str(tmp_path / "apply")], capsys)
    assert code == 0, err
    assert (tmp_path / "apply" / "probs.csv").read_text() == (tmp_path / "ens" / "probs.csv").read_text()


def test_gemma4_31b_answers_after_the_thought_channel(family_files) -> None:
    """gemma-4-31B-it's template opens an empty thought channel at the generation prompt: the answer is read after it,
    and the prefix/image/question/options segments still tokenize like the whole conversation."""
    from mcvqa.config import ImageConfig
    from mcvqa.features import Encoder
    from mcvqa.model import load_processor
    from mcvqa.prompts import load_prompt

    processor = load_processor(str(family_files / "gemma-4-31B-it"))
    enc = Encoder(processor, load_prompt("fewshot_ko"), ImageConfig(mode="letterbox", size=256))
    assert enc.family.name == "gemma4" and enc.frame.placeholder == "<|image|>"
    assert enc.frame.tail.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    items, images = _items_and_images(1)
    ex = enc.encode(items[0], image=images[0])
    whole = processor(text=[enc.full_text(items[0])], images=[images[0]], add_special_tokens=False)["input_ids"][0]
    assert list(whole) == enc.prefix_ids + ex.suffix_ids
    # The answer position (the last option token) is the channel's close, not the model turn's newline.
    assert processor.tokenizer.convert_ids_to_tokens(ex.option_ids[-4:]) == ["<|channel>", "thought", "\n", "<channel|>"]


def test_images_of_different_sizes_batch_and_split_back() -> None:
    """AnyRes tiles and Gemma's patch lists differ per image: dim 1 is padded (position ids with -1), and cutting a
    batch in two (out-of-memory halving) gives each half exactly its own images' rows."""
    from mcvqa.features import Example, cat_vision, collate

    def ex(i: int, patches: int) -> Example:
        vision = {"pixel_values": torch.full((1, patches, 3), float(i + 1)), "image_position_ids": torch.full((1, patches, 2), i)}
        return Example(f"q{i}", [7, 8, 9], [1], [2, 3], vision, [0, 1, 0])

    vision, rows = cat_vision([ex(0, 4).vision, ex(1, 6).vision], {"image_position_ids": -1})
    assert vision["pixel_values"].shape == (2, 6, 3) and rows == {"pixel_values": [1, 1], "image_position_ids": [1, 1]}
    assert (vision["pixel_values"][0, 4:] == 0).all() and (vision["image_position_ids"][0, 4:] == -1).all()
    assert (vision["image_position_ids"][1] == 1).all()
    batch = collate([ex(0, 4), ex(1, 6), ex(2, 5)], pad_id=0, vision_pad={"image_position_ids": -1})
    assert batch.mm_token_type_ids[:, :3].tolist() == [[0, 1, 0]] * 3
    second = batch.rows(1, 3)
    assert second.ids == ["q1", "q2"] and second.vision["pixel_values"][:, 0, 0].tolist() == [2.0, 3.0]


def test_qwen3_5_trains_on_the_pytorch_delta_rule_where_fla_refuses_its_backward(family_models, synth_data, tmp_path, capsys, monkeypatch) -> None:
    """flash-linear-attention refuses its gated backward kernel on Hopper GPUs with Triton 3.4-3.7.0 (fla #640), and
    only once a whole forward has run. Where that combination holds, ``mcvqa train`` (and test-time adaptation's first
    gradient) run forwards that record gradients on transformers' PyTorch gated delta rule, with one line saying so,
    and train; forwards without gradients keep the kernel; elsewhere nothing changes. The refusing kernel is simulated:
    this machine has neither fla nor a Hopper GPU."""
    import inspect

    from transformers.models.qwen3_5 import modeling_qwen3_5

    from mcvqa.config import ImageConfig
    from mcvqa.families import qwen3_5
    from mcvqa.features import Encoder
    from mcvqa.images import letterbox
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import Scorer

    reference = inspect.unwrap(modeling_qwen3_5.torch_chunk_gated_delta_rule)
    calls = {"fla": 0, "torch": 0}

    class _Refuses(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated chunk_bwd_dqkwg (see #640)")

    def fla_rule(*args, **kwargs):  # fla's forward is fine; its backward refuses
        calls["fla"] += 1
        out, state = reference(*args, **kwargs)
        return _Refuses.apply(out), state

    def torch_rule(*args, **kwargs):
        calls["torch"] += 1
        return reference(*args, **kwargs)

    fla_rule.__wrapped__ = torch_rule
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", fla_rule)
    model_dir = family_models("local_qwen3_5")
    model, processor = _load(model_dir)
    monkeypatch.setattr(qwen3_5, "fla_refuses_gated_backward", lambda: False)
    assert qwen3_5.Qwen35().prepare_backward(model) is None and modeling_qwen3_5.torch_chunk_gated_delta_rule is fla_rule  # elsewhere: kept
    monkeypatch.setattr(qwen3_5, "fla_refuses_gated_backward", lambda: True)
    enc = Encoder(processor, load_prompt("plain_ko"), ImageConfig(mode="letterbox", size=64), qwen3_5.Qwen35())
    items, raw = _items_and_images(2)
    batch = enc.collate([enc.encode(it, image=letterbox(im, 64)) for it, im in zip(items, raw)])
    scorer = Scorer(model, enc)
    scorer.logprobs(batch, grad=True).sum().backward()  # test-time adaptation's path
    assert calls["torch"] > 0 and calls["fla"] == 0, calls
    calls.update(fla=0, torch=0)
    scorer.logprobs(batch)  # prediction keeps the kernel
    assert calls["fla"] > 0 and calls["torch"] == 0, calls
    assert qwen3_5.Qwen35().prepare_backward(model) is None  # once: no second wrapper, no second line
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", fla_rule)
    lines = (synth_data / "train.csv").read_text(encoding="utf-8").splitlines()
    csv = synth_data / "family_fla_train.csv"
    csv.write_text("\n".join(lines[:9]) + "\n", encoding="utf-8")
    code, out, err = run_cli(["train", "--data", str(csv), "--out", str(tmp_path / "run"), "--model", str(model_dir), "--device", "cpu",
                              "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "lora.r=4", "--set", "data.val_fraction=0.25",
                              "--set", "model.dtype=fp32", "--set", "prompt.name=plain_ko"], capsys)
    assert code == 0, err
    assert "flash-linear-attention refuses" in out + err and "pip install tilelang" in out + err


@pytest.mark.parametrize(
    "hopper, above_3_4, above_3_7_1, tilelang, refuses",
    [(True, True, False, False, True), (True, True, False, True, False), (True, True, True, False, False),
     (False, True, False, False, False), (True, False, False, False, False), (True, True, None, False, True)],
)
def test_fla_refusal_is_read_from_fla_itself(monkeypatch, hopper, above_3_4, above_3_7_1, tilelang, refuses) -> None:
    """The check reads fla's own flags and asks its TileLang backend whether it can run (tilelang, nvcc, FLA_TILELANG);
    a release without the 3.7.1 flag refuses on every Triton >= 3.4 (None: the flag is absent)."""
    import importlib.machinery
    import sys
    import types

    from mcvqa.families import qwen3_5

    fla = types.ModuleType("fla")
    fla.__spec__ = importlib.machinery.ModuleSpec("fla", None)
    utils = types.ModuleType("fla.utils")
    utils.IS_NVIDIA_HOPPER, utils.TRITON_ABOVE_3_4_0 = hopper, above_3_4
    if above_3_7_1 is not None:
        utils.TRITON_ABOVE_3_7_1 = above_3_7_1
    backends = types.ModuleType("fla.backends")
    backends.TileLangBackend = type("TileLangBackend", (), {"can_use": staticmethod(lambda: tilelang)})
    fla.utils, fla.backends = utils, backends
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.utils", utils)
    monkeypatch.setitem(sys.modules, "fla.backends", backends)
    assert qwen3_5.fla_refuses_gated_backward() is refuses
