"""The 4-bit loading path (bitsandbytes nf4) runs on CPU too, so it is tested without a GPU."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'mcvqa[gpu]')")


def test_nf4_loads_and_scores_on_cpu(tiny_model, cfg_factory, synth_data) -> None:
    from mcvqa.data import read_csv
    from mcvqa.features import Encoder, collate
    from mcvqa.model import load_model
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import Scorer

    cfg = cfg_factory("model.quant=nf4")
    model, processor = load_model(cfg.model)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "language-model linears are 4-bit"
    assert all("visual" not in n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)), "vision stays full precision"
    enc = Encoder(processor, load_prompt("plain_ko"), cfg.image)
    items = read_csv(synth_data / "test.csv").items[:4]
    p = Scorer(model, enc).logprobs(collate([enc.encode(it) for it in items], enc.pad_id)).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_unpacked_4bit_weights_score_like_the_packed_ones(tiny_model, cfg_factory, synth_data, with_adapter) -> None:
    """``predict.unpack_4bit``: every 4-bit linear becomes a plain one holding the dequantised weight (the same values
    bitsandbytes dequantises in each product), so the probabilities are the packed model's up to float rounding,
    also under a LoRA adapter's wrapper; ``auto`` leaves a CPU model packed, ``off`` leaves anything packed."""
    from mcvqa.data import read_csv
    from mcvqa.features import Encoder, collate
    from mcvqa.model import attach_lora, load_model, unpack_4bit
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import Scorer

    cfg = cfg_factory("model.quant=nf4", "lora.r=4")
    model, processor = load_model(cfg.model)
    if with_adapter:
        model = attach_lora(model, cfg.lora)
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        model.eval()
    enc = Encoder(processor, load_prompt("plain_ko"), cfg.image)
    items = read_csv(synth_data / "test.csv").items[:4]
    batch = collate([enc.encode(it) for it in items], enc.pad_id)
    for m in model.modules():  # bitsandbytes' AVX512-BF16 CPU kernel rounds on its own; GPUs take the generic path
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    packed = Scorer(model, enc).logprobs(batch)
    for m in model.modules():  # where the CPU has AVX512-BF16, a product now repacks the weights for it: unpack must undo that
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    Scorer(model, enc).logprobs(batch)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert unpack_4bit(model, "auto") == 0 and unpack_4bit(model, "off") == 0  # a CPU model stays packed under auto
    assert unpack_4bit(model, "on") == n4 > 0
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    unpacked = Scorer(model, enc).logprobs(batch)
    # Repacking for the AVX512-BF16 kernel rounds the block scales to bf16 (bitsandbytes' own choice, CPU only): the
    # unpacked weights then carry that rounding (~3e-4 here; unpacking the repacked layout wrongly is ~0.3 off).
    repacked = bnb.functional.has_avx512bf16()
    torch.testing.assert_close(unpacked, packed, atol=2e-3 if repacked else 1e-5, rtol=0)
    if with_adapter:
        assert any("lora_A" in n for n, _ in model.named_parameters()), "the adapter still wraps the unpacked layers"


@pytest.mark.parametrize("methods, asked, used", [([], "auto", "auto"), (["tent"], "auto", "off"), (["tpt"], "auto", "off"),
                                                  (["sar"], "on", "on"), (["orders"], "auto", "auto")])
def test_auto_unpacking_leaves_gradient_test_time_methods_packed(cfg_factory, tiny_loaded, monkeypatch, methods, asked, used) -> None:
    """``predict.unpack_4bit: auto`` (the default) keeps 4-bit weights packed for TENT, SAR and TPT, whose backward passes
    need the memory the unpacked weights would take; an explicit ``on`` is obeyed."""
    from mcvqa import model as model_module
    from mcvqa.predict import build_scorer

    seen = []
    monkeypatch.setattr(model_module, "load_model", lambda cfg, adapter=None, laps=None, on_processor=None: tiny_loaded)
    monkeypatch.setattr(model_module, "unpack_4bit", lambda model, mode="auto": seen.append(mode) or 0)
    cfg = cfg_factory("model.quant=nf4", f"predict.unpack_4bit={asked}")
    cfg.tta.methods = list(methods)
    build_scorer(cfg)
    assert seen == [used]
