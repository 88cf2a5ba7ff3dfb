"""predict end to end on the tiny model: outputs, formats, journal and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mcvqa.errors import McvqaError
from mcvqa.outputs import validate_submission
from mcvqa.predict import build_scorer, predict


@pytest.fixture(scope="module")
def scorer(cfg_factory, tiny_loaded):
    return build_scorer(cfg_factory(), model=tiny_loaded[0], processor=tiny_loaded[1])


def test_outputs_match_the_test_csv(cfg_factory, scorer, synth_data, tmp_path) -> None:
    cfg = cfg_factory("predict.batch_size=5")
    res = predict(cfg, synth_data / "test.csv", tmp_path / "run", scorer=scorer, progress=False, log=lambda s: None)
    test = pd.read_csv(synth_data / "test.csv")
    sample = pd.read_csv(synth_data / "sample_submission.csv")
    sub = pd.read_csv(res.submission)
    assert list(sub.columns) == list(sample.columns) == ["id", "answer"]
    assert sub["id"].tolist() == test["id"].tolist()
    assert set(sub["answer"]) <= set("abcd")
    probs = pd.read_csv(res.probs)
    assert list(probs.columns) == ["id", "p_a", "p_b", "p_c", "p_d", "answer"]
    np.testing.assert_allclose(probs[["p_a", "p_b", "p_c", "p_d"]].sum(axis=1), 1.0, atol=1e-6)
    assert (probs["answer"] == sub["answer"]).all()
    assert (tmp_path / "run" / "config.yaml").exists()
    summary = json.loads((tmp_path / "run" / "predict_summary.json").read_text())
    assert summary["questions"] == len(test)


def test_submission_bytes_do_not_depend_on_batch_size(cfg_factory, scorer, synth_data, tmp_path) -> None:
    a = predict(cfg_factory("predict.batch_size=1"), synth_data / "test.csv", tmp_path / "a", scorer=scorer, progress=False, log=lambda s: None)
    b = predict(cfg_factory("predict.batch_size=16"), synth_data / "test.csv", tmp_path / "b", scorer=scorer, progress=False, log=lambda s: None)
    assert a.submission.read_bytes() == b.submission.read_bytes()


def test_resume_after_interruption_is_byte_identical(cfg_factory, scorer, synth_data, tmp_path, monkeypatch) -> None:
    cfg = cfg_factory("predict.batch_size=4")
    full = predict(cfg, synth_data / "test.csv", tmp_path / "full", scorer=scorer, progress=False, log=lambda s: None)

    calls = {"n": 0}
    real = scorer.logprobs  # the forward the engine calls for each batch

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return real(*a, **k)

    monkeypatch.setattr(scorer, "logprobs", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        predict(cfg, synth_data / "test.csv", tmp_path / "cut", scorer=scorer, progress=False, log=lambda s: None)
    assert not (tmp_path / "cut" / "submission.csv").exists()  # nothing partial under the final name
    monkeypatch.setattr(scorer, "logprobs", real)
    with pytest.raises(McvqaError, match="pass --resume"):
        predict(cfg, synth_data / "test.csv", tmp_path / "cut", scorer=scorer, progress=False, log=lambda s: None)
    res = predict(cfg, synth_data / "test.csv", tmp_path / "cut", scorer=scorer, resume=True, progress=False, log=lambda s: None)
    assert res.resumed_batches == 2
    assert res.submission.read_bytes() == full.submission.read_bytes()
    assert res.probs.read_bytes() == full.probs.read_bytes()


def test_batches_run_with_the_loaded_model_left_out_of_garbage_collection_and_given_back_after(cfg_factory, scorer, synth_data, tmp_path, monkeypatch) -> None:
    """The loaded model is never garbage while questions are scored: a full collection walking it would hold the host
    while the GPU idles (``runtime.frozen_heap``). After the command the collector has it back (a process that
    predicts again, with another model, frees this one's reference cycles)."""
    import gc

    from mcvqa import predict as predict_module

    frozen: list[int] = []
    real = predict_module._score
    monkeypatch.setattr(predict_module, "_score", lambda *a, **k: (frozen.append(gc.get_freeze_count()), real(*a, **k))[1])
    predict(cfg_factory(), synth_data / "test.csv", tmp_path / "run", scorer=scorer, progress=False, log=lambda s: None)
    assert frozen and frozen[0] > 10_000, frozen
    assert gc.get_freeze_count() == 0


def test_predict_writes_each_batch_after_the_prefix_laid_out_once(cfg_factory, scorer, tiny_loaded, synth_data, tmp_path, monkeypatch) -> None:
    """``mcvqa predict``'s scorer keeps the prefix laid out per row (``scoring.PrefixRows``, ``predict.prefix_rows``):
    every batch's attention layers read it in place instead of concatenating it again, and the submission is the
    concatenating scorer's (``predict.prefix_rows=false``, which never touches the buffers)."""
    from mcvqa.scoring import PrefixRows

    joined: list[bool] = []
    buffers: set[int] = set()
    real = PrefixRows.join

    def join(self, i, *args):
        out = real(self, i, *args)
        joined.append(out is not None)
        if out is not None and i == 0:
            buffers.add(self.keys[0].data_ptr())
        return out

    monkeypatch.setattr(PrefixRows, "join", join)
    cfg = cfg_factory("predict.batch_size=5")
    kept = predict(cfg, synth_data / "test.csv", tmp_path / "kept", scorer=scorer, progress=False, log=lambda s: None)
    assert joined and all(joined)
    batches = -(-len(pd.read_csv(synth_data / "test.csv")) // 5)
    assert 1 <= len(buffers) < batches  # made once (again only for longer rows), not per batch
    joined.clear()
    plain = build_scorer(cfg_factory("predict.prefix_rows=false"), model=tiny_loaded[0], processor=tiny_loaded[1])
    again = predict(cfg, synth_data / "test.csv", tmp_path / "plain", scorer=plain, progress=False, log=lambda s: None)
    assert not joined
    assert kept.submission.read_bytes() == again.submission.read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(kept.probs), pd.read_csv(again.probs), atol=1e-6, rtol=0)


def test_predict_keeps_no_prefix_rows_where_whole_layers_are_compiled(cfg_factory, tiny_loaded, monkeypatch) -> None:
    """``predict.compile=layers`` traces whole decoder layers, where the kept rows' bookkeeping would break their
    graphs (a graph break and a recompile per layer): that scorer concatenates; narrower scopes keep the rows."""
    import mcvqa.kernels

    monkeypatch.setattr(mcvqa.kernels, "compile_blocks", lambda core, scope: 0)
    keep = {scope: build_scorer(cfg_factory(f"predict.compile={scope}"), model=tiny_loaded[0], processor=tiny_loaded[1]).keep_rows
            for scope in ("off", "mlp", "layers")}
    assert keep == {"off": True, "mlp": True, "layers": False}


def test_validate_submission_catches_mistakes() -> None:
    ids = ["t1", "t2", "t3"]
    validate_submission(pd.DataFrame({"id": ids, "answer": ["a", "b", "d"]}), ids)
    with pytest.raises(McvqaError, match="3 test ids"):
        validate_submission(pd.DataFrame({"id": ids[:2], "answer": ["a", "b"]}), ids)
    with pytest.raises(McvqaError, match="same order"):
        validate_submission(pd.DataFrame({"id": ["t2", "t1", "t3"], "answer": ["a", "b", "c"]}), ids)
    with pytest.raises(McvqaError, match="not one of a, b, c, d"):
        validate_submission(pd.DataFrame({"id": ids, "answer": ["a", "e", "c"]}), ids)


def test_four_thousand_rows_with_progress(cfg_factory, scorer, tmp_path, capsys) -> None:
    """A scale check: 1,500 competition-format rows on CPU (more than 20 batches of 64), with a progress bar."""
    from mcvqa.synth import SynthConfig, synthesize

    synthesize(tmp_path / "d", SynthConfig(train=0, test=1500, seed=11))
    res = predict(cfg_factory("predict.batch_size=64"), tmp_path / "d" / "test.csv", tmp_path / "run", scorer=scorer, progress=True, log=lambda s: None)
    assert res.n == 1500
    assert len(pd.read_csv(res.submission)) == 1500
    assert "1500/1500" in capsys.readouterr().err


def _watch_the_load(monkeypatch, events: list, fail: bool = False) -> list:
    """Record, in order, each loader the engine starts (``iterate_batches``) and the weights' load (with the child
    processes alive then); the pixel dtype of every batch scored is returned in a list as it fills."""
    import multiprocessing

    import transformers

    from mcvqa import engine
    from mcvqa.scoring import Scorer

    iterate, prepared = engine.iterate_batches, engine.iterate_prepared
    load, logprobs = transformers.AutoModelForImageTextToText.from_pretrained, Scorer.logprobs
    dtypes: list = []

    def iterate_(*a, **k):
        events.append("loader")
        return iterate(*a, **k)

    def prepared_(*a, **k):
        events.append("loader")
        return prepared(*a, **k)

    def load_(*a, **k):
        events.append(("weights", len(multiprocessing.active_children())))  # the loader's workers running by now
        if fail:
            raise OSError("weights unreadable")
        return load(*a, **k)

    def logprobs_(self, batch, *a, **k):
        dtypes.append(batch.vision["pixel_values"].dtype)
        return logprobs(self, batch, *a, **k)

    monkeypatch.setattr(engine, "iterate_batches", iterate_)
    monkeypatch.setattr(engine, "iterate_prepared", prepared_)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", staticmethod(load_))
    monkeypatch.setattr(Scorer, "logprobs", logprobs_)
    return dtypes


@pytest.mark.parametrize("methods", ["", "orders"])
def test_the_loaders_workers_start_before_the_weights_and_their_batches_are_scored(cfg_factory, synth_data, tmp_path, monkeypatch, methods) -> None:
    """``predict`` starts its loader once the processor is loaded, so the first batches are made while the weights
    load (plain scoring's, or the orders pass of ``--tta orders``); the scoring takes that loader (no second one for
    that pass) and its probabilities are a fresh loader's, byte for byte."""
    cfg = cfg_factory("predict.batch_size=5", "predict.num_workers=2", *([f"tta.methods=[{methods}]"] if methods else []))
    reference = predict(cfg, synth_data / "test.csv", tmp_path / "fresh", scorer=build_scorer(cfg), progress=False, log=lambda s: None)
    events: list = []
    _watch_the_load(monkeypatch, events)
    res = predict(cfg, synth_data / "test.csv", tmp_path / "early", progress=False, log=lambda s: None)
    assert events == ["loader", ("weights", 2)], "the two workers run before the weights load"
    assert res.probs.read_bytes() == reference.probs.read_bytes()


@pytest.mark.parametrize("methods", ["views", "orders,views", "pride", "tent"])
def test_a_first_pass_that_needs_the_model_starts_no_loader_before_the_weights(cfg_factory, synth_data, tmp_path, monkeypatch, methods) -> None:
    """Views, PriDe's sample and the adapting methods make their first batches with the model: nothing starts early."""
    from mcvqa.config import TTAConfig
    from mcvqa.tta.compose import first_pass

    assert first_pass(TTAConfig(methods=methods.split(",")), None, 3) is None
    assert first_pass(TTAConfig(methods=["orders"]), None, 3)["phase"] == "orders"
    cfg = cfg_factory("predict.batch_size=5", "predict.num_workers=2", f"tta.methods=[{methods}]", "tta.views=[crop]", "tta.pride_min=6", "tta.params=norm")
    events: list = []
    _watch_the_load(monkeypatch, events)
    predict(cfg, synth_data / "test.csv", tmp_path / "run", progress=False, log=lambda s: None)
    assert events[0] == ("weights", 0)


def test_an_early_loader_for_other_pixels_than_the_model_takes_is_stopped_and_replaced(cfg_factory, synth_data, tmp_path, monkeypatch) -> None:
    """The pixel dtype said before the load (:meth:`Family.pixel_dtype_for`) is checked against the loaded model's:
    where they differ, the batches already made are dropped and a loader for the right encoder starts."""
    from mcvqa.families.qwen_vl import QwenVL

    cfg = cfg_factory("predict.batch_size=5", "predict.num_workers=2")
    monkeypatch.setattr(QwenVL, "pixel_dtype_for", lambda self, dtype, wrapped=None: torch.float16)  # the tiny model loads in fp32
    events: list = []
    dtypes = _watch_the_load(monkeypatch, events)
    predict(cfg, synth_data / "test.csv", tmp_path / "run", progress=False, log=lambda s: None)
    assert events == ["loader", ("weights", 2), "loader"]
    assert dtypes and set(dtypes) == {torch.float32}


@pytest.mark.parametrize("vision", [True, False])
def test_an_adapter_on_the_patch_embedding_is_foreseen_by_the_early_loader(cfg_factory, synth_data, tmp_path, monkeypatch, vision) -> None:
    """An adapter trained with ``lora.vision`` wraps the patch embedding, is never merged, and the loaded model then
    takes the processor's pixels as they are: the early loader, told so by the adapter's own config before the
    weights exist, makes those and is kept (not replaced by a second loader after the load)."""
    from mcvqa.families.qwen_vl import PATCH_EMBED
    from mcvqa.model import adapter_wraps, attach_lora, load_model

    cfg = cfg_factory("lora.r=4", f"lora.vision={str(vision).lower()}", "predict.batch_size=5", "predict.num_workers=2")
    model, _ = load_model(cfg.model)
    model = attach_lora(model, cfg.lora)
    model.save_pretrained(str(tmp_path / "adapter"))
    # The name the family foresees is the one peft wraps in the loaded model.
    assert adapter_wraps(tmp_path / "adapter")(PATCH_EMBED) is vision
    assert hasattr(model.base_model.model.get_submodule(PATCH_EMBED), "lora_A") is vision
    events: list = []
    dtypes = _watch_the_load(monkeypatch, events)
    predict(cfg, synth_data / "test.csv", tmp_path / "run", adapter=tmp_path / "adapter", progress=False, log=lambda s: None)
    assert events == ["loader", ("weights", 2)]
    assert dtypes and set(dtypes) == {torch.float32}


@pytest.mark.parametrize("failing", ["weights", "journal"])
def test_a_run_that_fails_before_scoring_leaves_no_loader_worker_running(cfg_factory, synth_data, tmp_path, monkeypatch, failing) -> None:
    """The early loader's workers end with the command's failure: a model that cannot load, or a journal that cannot
    be written once it has (a full disk), even while the caller still holds the exception (and predict's frame)."""
    import errno
    import multiprocessing

    from mcvqa.engine import Journal

    cfg = cfg_factory("predict.batch_size=5", "predict.num_workers=2")
    events: list = []
    _watch_the_load(monkeypatch, events, fail=failing == "weights")
    if failing == "journal":
        monkeypatch.setattr(Journal, "_start", lambda self: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(McvqaError, match="cannot load the model" if failing == "weights" else "space") as caught:
        predict(cfg, synth_data / "test.csv", tmp_path / "run", progress=False, log=lambda s: None)
    assert events == ["loader", ("weights", 2)] and caught.traceback
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "run" / "journal.jsonl").exists()


@pytest.mark.parametrize("early", ["true", "false"])
def test_a_run_interrupted_while_scoring_leaves_no_loader_worker_running(cfg_factory, synth_data, tmp_path, monkeypatch, early) -> None:
    """Ctrl-C (or any failure) in the middle of the scoring ends the loader's workers even while the caller still
    holds the exception, whose traceback keeps the engine's frame (a notebook, ``mcvqa demo``'s one process); the
    batches scored before it are in the journal."""
    import multiprocessing

    from mcvqa import engine as eng

    scored, calls = eng.Engine._scored, []

    def interrupted(self, fn, work):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return scored(self, fn, work)

    monkeypatch.setattr(eng.Engine, "_scored", interrupted)
    cfg = cfg_factory("predict.batch_size=4", "predict.num_workers=2", f"predict.early_loader={early}")
    with pytest.raises(KeyboardInterrupt) as caught:
        predict(cfg, synth_data / "test.csv", tmp_path / "run", progress=False, log=lambda s: None)
    assert caught.traceback and len(calls) == 3
    assert multiprocessing.active_children() == []
    journal = (tmp_path / "run" / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line).get("batch") for line in journal[1:]] == [0, 1]


def test_a_loader_with_no_batches_to_make_starts_no_worker(encoder, synth_data) -> None:
    """A resumed phase whose batches are all in the journal, or a rank with none, forks no worker for nothing."""
    import multiprocessing

    from mcvqa.data import read_csv
    from mcvqa.engine import iterate_batches, iterate_prepared

    items = read_csv(synth_data / "test.csv").items
    loaders = [iterate_batches(items, encoder, [], with_prefix=False, num_workers=2), iterate_prepared(items, [], encoder.load, num_workers=2)]
    assert multiprocessing.active_children() == []
    assert [list(loader) for loader in loaders] == [[], []]


def test_a_started_loader_is_taken_only_by_the_scoring_it_was_started_for(scorer, synth_data, monkeypatch) -> None:
    """:meth:`Engine.start` makes plain scoring's batches ahead; :meth:`Engine.map` takes them for exactly that
    scoring (same probabilities as a loader of its own) and starts its own for anything else: other prefix setting,
    another encoder, other questions, other batches left to do (the journal), or after :meth:`Engine.stop`."""
    import copy

    from mcvqa import engine as eng
    from mcvqa.data import read_csv

    items = read_csv(synth_data / "test.csv").items
    iterate, made = eng.iterate_batches, []
    monkeypatch.setattr(eng, "iterate_batches", lambda *a, **k: (made.append(1), iterate(*a, **k))[1])
    fresh = eng.Engine(items, scorer.encoder, 5, progress=False).score(scorer).probs
    engine = eng.Engine(items, scorer.encoder, 5, progress=False)
    made.clear()
    engine.start(with_prefix=scorer.with_prefix_in_batch)
    assert np.array_equal(engine.score(scorer).probs, fresh) and len(made) == 1
    for change in ("prefix", "encoder", "questions", "stopped", "journal"):
        made.clear()
        engine.encoder, engine.done = scorer.encoder, {}
        engine.start(with_prefix=scorer.with_prefix_in_batch != (change == "prefix"))
        if change == "encoder":
            engine.encoder = copy.copy(scorer.encoder)
        if change == "stopped":
            engine.stop()
        if change == "journal":  # a batch found done after the start: the started loader's batches are one too many
            first = engine._started[2][0]
            engine.done = {("", 0): {"ids": [items[i].id for i in first], "probs": fresh[first].tolist()}}
        out = engine.score(scorer, indices=range(7) if change == "questions" else None).probs
        assert len(made) == 2, change  # the started one and its own
        if change == "questions":  # other batches, other padding: equal within fp32
            assert np.allclose(out, fresh[:7], atol=1e-5)
        else:
            assert np.array_equal(out, fresh), change


def test_auto_workers_decode_in_parallel_only_on_a_gpu(monkeypatch) -> None:
    from mcvqa.features import resolve_num_workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_num_workers(-1) == 0 and resolve_num_workers(3) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_num_workers(-1) == 8  # the data path saturates near 8 on a 16-core host (BENCHMARKS.md, "Speed II")
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert resolve_num_workers(-1) == 5  # one core left for the process that drives the GPU
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_workers(-1) == 1


@pytest.mark.parametrize("methods, quant", [([], "none"), (["tent"], "none"), (["blend"], "none"), ([], "nf4")])
def test_adapter_merged_for_prediction_scores_as_the_unmerged_one(cfg_factory, synth_data, tmp_path, methods, quant) -> None:
    """``predict.merge_adapter: auto`` (the default) folds the adapter into plain base weights, 4-bit weights unpacked
    by ``predict.unpack_4bit`` included (peft's wrapper there is still its 4-bit class): no LoRA layer is left and
    the probabilities are the unmerged adapter's (fp32). A test-time method that trains the adapter (TENT) or
    switches it off (blend) keeps it apart."""
    from peft.tuners.lora import LoraLayer

    from mcvqa.data import read_csv
    from mcvqa.features import collate
    from mcvqa.model import attach_lora, load_model
    from mcvqa.predict import build_scorer

    cfg = cfg_factory("lora.r=4", f"model.quant={quant}", "predict.unpack_4bit=on", *([f"tta.methods=[{methods[0]}]"] if methods else []))
    model, processor = load_model(cfg.model)
    model = attach_lora(model, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero: an adapter that changes nothing would merge to anything
                p.normal_(0, 0.3)
    model.save_pretrained(str(tmp_path / "adapter"))
    logprobs = {}
    for mode in ("auto", "off"):
        cfg.predict.merge_adapter = mode
        scorer = build_scorer(cfg, tmp_path / "adapter")
        lora = sum(isinstance(m, LoraLayer) for m in scorer.model.modules())
        assert (lora == 0) == (mode == "auto" and not methods), (mode, lora)
        items = read_csv(synth_data / "test.csv").items[:4]
        batch = collate([scorer.encoder.encode(it) for it in items], scorer.encoder.pad_id)
        logprobs[mode] = scorer.logprobs(batch)
    base = build_scorer(cfg).logprobs(batch)
    assert (logprobs["off"] - base).abs().max() > 1e-3, "the adapter changes the scores"
    torch.testing.assert_close(logprobs["auto"], logprobs["off"], atol=1e-5, rtol=0)
