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
