"""Training: what moves, what is masked, the shared-prefix step, resume, K-fold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mcvqa.data import read_csv, stratified_split
from mcvqa.features import collate
from mcvqa.scoring import letter_tokens
from mcvqa.train import AnswerLoss, TrainDataset, build_model, epoch_batches, train, train_split

LORA = ["train.method=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.report_to=[]", "prompt.name=plain_ko"]


@pytest.fixture(scope="module")
def data(synth_data):
    ds = read_csv(synth_data / "train.csv", require_answer=True)
    return stratified_split(ds, 0.25, 0)


def _quiet(*_a, **_k) -> None:
    return None


def test_lora_moves_adapter_and_base_stays_bit_identical(cfg_factory, data, tmp_path) -> None:
    cfg = cfg_factory(*LORA, "train.epochs=1", "train.batch_size=8", "train.lr=1e-2", "train.eval_every=never")
    model, _ = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_split(cfg, data[0], [], tmp_path / "r", progress=False, log_fn=_quiet)
    # The run saved its adapter; reload what was trained and compare with the untouched copy.
    trained = load_file(str(tmp_path / "r" / "last" / "adapter_model.safetensors"))
    assert trained, "adapter saved"
    from mcvqa.model import load_adapter, load_model

    base, _ = load_model(cfg.model)
    peft = load_adapter(base, tmp_path / "r" / "last")
    moved = 0
    for n, p in peft.named_parameters():
        if "lora_" in n:
            key = n.replace(".default", "")
            moved += int(not torch.equal(p, before[n])) if n in before else 0
        else:
            assert torch.equal(p, before[n]), f"base weight {n} changed"
    assert moved > 0
    meta = json.loads((tmp_path / "r" / "last" / "adapter_config.json").read_text())
    assert meta["r"] == 4 and meta["use_rslora"] is True


def test_answer_loss_keeps_its_buffers_on_the_model_device(tiny_loaded, encoder) -> None:
    """DDP broadcasts every buffer when it wraps the module; a CPU buffer beside CUDA weights fails under
    NCCL ("No backend type associated with device type cpu"), found on 2 H100s. ``meta`` stands in for CUDA."""
    model, processor = tiny_loaded
    meta_model = torch.nn.Module()
    meta_model.embed = torch.nn.Embedding(4, 2, device="meta")
    meta_model.get_input_embeddings = lambda: meta_model.embed  # type: ignore[method-assign]
    module = AnswerLoss(meta_model, encoder.prefix_ids, letter_tokens(processor.tokenizer).target)
    assert {b.device.type for b in module.buffers()} == {"meta"}


def test_steady_rate_skips_the_first_steps() -> None:
    from mcvqa.train.loop import _steady_rate

    steps = [(1.0, 8)] * 4 + [(0.5, 8), (0.25, 4)]  # (seconds, samples): 4 slow steps, then the steady ones
    assert _steady_rate(steps, world=1) == pytest.approx(12 / 0.75)
    assert _steady_rate(steps, world=2) == pytest.approx(24 / 0.75)
    assert _steady_rate(steps[:4], world=1) is None


def test_answer_loss_equals_masked_label_loss(cfg_factory, tiny_loaded, encoder, data) -> None:
    """Our loss is exactly the standard one with every label masked (-100) except the answer letter."""
    model, processor = tiny_loaded
    letters = letter_tokens(processor.tokenizer)
    items = data[0].items[:4]
    exs = [encoder.encode(it) for it in items]
    module = AnswerLoss(model, encoder.prefix_ids, letters.target, shared_prefix="cache")
    with torch.no_grad():
        ours, _ = module(collate(exs, encoder.pad_id))
        ref = []
        for ex in exs:
            ids = torch.tensor([encoder.prefix_ids + ex.suffix_ids + [letters.target[ex.label]]])
            labels = torch.full_like(ids, -100)
            labels[0, -1] = ids[0, -1]
            out = model(
                input_ids=ids, labels=labels, pixel_values=ex.vision["pixel_values"], image_grid_thw=ex.vision["image_grid_thw"],
                mm_token_type_ids=(ids == encoder.image_token_id).int(),
            )
            ref.append(out.loss)
    torch.testing.assert_close(ours, torch.stack(ref).mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["cache", "packed"])
def test_shared_prefix_step_equals_plain_step(cfg_factory, data, checkpointing, mode) -> None:
    """Loss and every gradient match between the prefix-once step and the whole-sequence step."""
    cfg = cfg_factory(*LORA, f"train.gradient_checkpointing={str(checkpointing).lower()}", "prompt.name=fewshot_ko")
    model, processor = build_model(cfg)
    model.train()
    from mcvqa.features import Encoder
    from mcvqa.prompts import load_prompt

    enc = Encoder(processor, load_prompt("fewshot_ko"), cfg.image)
    letters = letter_tokens(processor.tokenizer)
    exs = [enc.encode(it) for it in data[0].items[:5]]
    grads = {}
    for shared in (mode, "off"):
        model.zero_grad(set_to_none=True)
        module = AnswerLoss(model, enc.prefix_ids, letters.target, shared_prefix=shared)
        batch = collate(exs, enc.pad_id, enc.prefix_ids if shared == "off" else None)
        loss, _ = module(batch)
        loss.backward()
        grads[shared != "off"] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l1, g1), (l2, g2) = grads[True], grads[False]
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_attend_row_by_row_in_the_forward_and_the_recomputation(cfg_factory, data, monkeypatch, checkpointing) -> None:
    """``train.shared_prefix: rows``: the packed step's attention runs as the prefix's plus each row's
    (kernels.PackedRows), never as SDPA over the dense (T, T) mask, in every layer of the forward and of a checkpointed
    layer's recomputation; ``packed`` keeps the dense mask. Same loss and gradients (rows of three different lengths,
    so the side-by-side layout pads)."""
    from mcvqa import kernels
    from mcvqa.features import Encoder
    from mcvqa.prompts import load_prompt
    from transformers.integrations import sdpa_attention

    cfg = cfg_factory(*LORA, f"train.gradient_checkpointing={str(checkpointing).lower()}", "prompt.name=fewshot_ko", "train.shared_prefix=rows")
    assert cfg.train.shared_prefix == "rows"
    model, processor = build_model(cfg)
    model.train()
    enc = Encoder(processor, load_prompt("fewshot_ko"), cfg.image)
    exs = [enc.encode(it) for it in data[0].items[:5]]
    long = data[0].items[5]
    exs.append(enc.encode(dataclasses.replace(long, question=long.question + " 그리고 길게 덧붙인 설명" * 3)))
    assert len({len(e.suffix_ids) for e in exs}) >= 3
    rows_sdpa, dense_sdpa = kernels._packed_rows_sdpa, sdpa_attention.sdpa_attention_forward
    calls = {"rows": 0, "dense": 0}

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(kernels, "_packed_rows_sdpa", count("rows", rows_sdpa))
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", count("dense", dense_sdpa))
    # Every layer but the last, which runs at the answer positions alone (kernels.answer_only_last_layer; its own test).
    from mcvqa import families

    last = families.decoder_layers(model)[-1]
    assert last.answers_only
    layers = (model.config.get_text_config().num_hidden_layers - 1) * (2 if checkpointing else 1)
    results = []
    for mode, expected in (("rows", {"rows": layers, "dense": 0}), ("packed", {"rows": 0, "dense": layers})):
        calls.update(rows=0, dense=0)
        model.zero_grad(set_to_none=True)
        loss, _ = AnswerLoss(model, enc.prefix_ids, letter_tokens(processor.tokenizer).target, shared_prefix=mode)(collate(exs, enc.pad_id))
        loss.backward()
        assert calls == expected, (mode, calls)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)


def test_language_model_attention_leaves_cudnn_out_on_a_gpu(cfg_factory, data, monkeypatch) -> None:
    """On a GPU the language model's attention (the packed step's prefix and rows, a real mask through transformers'
    SDPA, the answer-only last layer, in the forward and the checkpointed recomputation) runs with SDPA's cuDNN backend
    switched off: cuDNN would build a new graph on the host for nearly every call, its lengths and strides changing
    from step to step. The vision tower keeps SDPA's own choice. Here the tensors are on the CPU, so the test makes
    them count as CUDA (kernels._on_cuda)."""
    import sys
    import types

    from mcvqa import kernels
    from mcvqa.features import Encoder
    from mcvqa.prompts import load_prompt
    from transformers.integrations import sdpa_attention

    cfg = cfg_factory(*LORA, "train.gradient_checkpointing=true", "prompt.name=fewshot_ko", "train.shared_prefix=rows")
    model, processor = build_model(cfg)
    model.train()
    enc = Encoder(processor, load_prompt("fewshot_ko"), cfg.image)
    exs = [enc.encode(it) for it in data[0].items[:4]]
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def recording(*a, **k):
        seen.append((sys._getframe(1).f_code.co_name, torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*a, **k)

    # kernels' own F (torch.nn.functional itself must keep its function: the lower-right causal bias checks for it)
    monkeypatch.setattr(kernels, "F", types.SimpleNamespace(**{**vars(torch.nn.functional), "scaled_dot_product_attention": recording}))
    masked = sdpa_attention.sdpa_attention_forward

    def recording_masked(*a, **k):  # a real mask (here the dense packed one; Gemma's windows) goes to transformers' SDPA
        seen.append(("transformers_sdpa", torch.backends.cuda.cudnn_sdp_enabled()))
        return masked(*a, **k)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", recording_masked)
    monkeypatch.setattr(kernels, "_on_cuda", lambda t: True)
    letters = letter_tokens(processor.tokenizer).target
    expected = {"rows": {"_bottom_right_causal": {False}, "_answers_only": {False}, "_vision_sdpa": {True}},
                "packed": {"transformers_sdpa": {False}, "_answers_only": {False}, "_vision_sdpa": {True}}}
    for mode, want in expected.items():
        seen.clear()
        loss, _ = AnswerLoss(model, enc.prefix_ids, letters, shared_prefix=mode)(collate(exs, enc.pad_id))
        loss.backward()
        by_caller: dict[str, set[bool]] = {}
        for caller, cudnn in seen:
            by_caller.setdefault(caller, set()).add(cudnn)
        assert by_caller == want, (mode, by_caller)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # switched off for those calls only


def test_steps_run_with_the_loaded_heap_left_out_of_garbage_collection_and_given_back_after(cfg_factory, data, tmp_path, monkeypatch) -> None:
    """Python's full collections walk every object the process holds (the model, the libraries, their caches) and hold
    the host while the GPU idles: the training steps run with what was alive before them frozen
    (``runtime.frozen_heap``). After the run those objects are the collector's again, or a process that trains many
    times (``mcvqa tune``'s trials) would never free a finished model's reference cycles."""
    import gc

    from mcvqa.train import loop

    frozen: list[int] = []
    real = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", lambda run, *a, **k: (frozen.append(gc.get_freeze_count()), real(run, *a, **k))[1])
    cfg = cfg_factory(*LORA, "train.epochs=1", "train.batch_size=8", "train.eval_every=never")
    train_split(cfg, data[0], [], tmp_path / "r", progress=False, log_fn=_quiet)
    assert frozen and min(frozen) > 10_000, frozen  # every step: the model's modules and parameters among them
    assert gc.get_freeze_count() == 0


def test_frozen_heap_nests_and_gives_the_objects_back_when_its_block_raises() -> None:
    """Only the outermost block freezes and unfreezes; a block that raises (tune prunes a trial from inside training)
    still hands the objects back to the collector."""
    import gc

    from mcvqa import runtime

    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError, match="pruned"):
        with runtime.frozen_heap():
            outer = gc.get_freeze_count()
            with runtime.frozen_heap():
                assert gc.get_freeze_count() == outer > 0
            assert gc.get_freeze_count() == outer  # the inner block's end did not unfreeze the outer's objects
            raise RuntimeError("pruned")
    assert gc.get_freeze_count() == 0 and runtime._FROZEN == 0


def test_option_shuffle_remaps_labels(encoder, data) -> None:
    ds = TrainDataset(data[0].items, encoder, shuffle_options=True, seed=1)
    changed = 0
    for i, it in enumerate(data[0].items[:12]):
        s = ds.item(i)
        assert s.options[s.answer] == it.options[it.answer]
        assert sorted(s.options) == sorted(it.options)
        changed += s.options != it.options
    assert changed > 0
    ds.epoch = 1
    assert [ds.item(i).options for i in range(12)] != [TrainDataset(data[0].items, encoder, True, 1).item(i).options for i in range(12)]


def test_length_grouped_batches_cover_everything_once() -> None:
    lengths = [5, 50, 6, 49, 7, 48, 8, 47, 9, 46]
    def padding(batches):
        return sum(max(lengths[i] for i in x) * len(x) - sum(lengths[i] for i in x) for x in batches)

    grouped = epoch_batches(lengths, 2, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 2, seed=0, epoch=0, group_by_length=False)
    for b in (grouped, plain):
        assert sorted(i for x in b for i in x) == list(range(10))
    assert padding(grouped) < padding(plain)
    assert epoch_batches(lengths, 2, 0, 1, True) != grouped


def test_full_training_loss_falls(cfg_factory, data, tmp_path) -> None:
    cfg = cfg_factory("train.method=full", "train.epochs=4", "train.batch_size=4", "train.lr=2e-3", "prompt.name=plain_ko", "train.gradient_checkpointing=false")
    res = train_split(cfg, data[0], data[1].items, tmp_path / "full", progress=False, log_fn=_quiet)
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    losses = [l for _, l in m["losses"]]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    steps = m["step_seconds"]  # each optimiser step's seconds, in order
    assert len(steps) == m["steps"] == res.steps and min(steps) > 0 and sum(steps) < m["seconds"]
    assert (tmp_path / "full" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "full" / "best" / "model.safetensors").exists()
    assert len(res.history) == 4 and "val_accuracy" in res.history[0]
    assert list((tmp_path / "full" / "logs").glob("events.out.tfevents.*")), "TensorBoard log written"


def test_step_seconds_and_the_steady_rate_leave_validation_and_checkpoints_out(cfg_factory, data, tmp_path, monkeypatch) -> None:
    """A step's seconds run from its first micro-batch to the optimiser's step: an epoch's validation and a checkpoint
    (at the epoch's end, or every ``train.checkpoint_every_steps``) fall between steps. Each checkpoint here makes the
    loop's clock jump 1,000 s; no step may show it, and the steady rate is the steps' own."""
    from mcvqa.train import loop

    jumped = [0.0]
    real_clock, real_checkpoint = loop.time.perf_counter, loop.checkpoint

    def checkpoint(*a, **k):
        jumped[0] += 1000.0
        return real_checkpoint(*a, **k)

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: real_clock() + jumped[0]))
    monkeypatch.setattr(loop, "checkpoint", checkpoint)
    cfg = cfg_factory(*LORA, "train.epochs=2", "train.batch_size=4", "train.checkpoint_every_steps=2")
    res = train_split(cfg, data[0], data[1].items[:4], tmp_path / "r", progress=False, log_fn=_quiet)
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert jumped[0] >= 4000 and len(m["step_seconds"]) == res.steps >= 8  # mid-epoch checkpoints and both epochs' ends
    assert max(m["step_seconds"]) < 1000, m["step_seconds"]
    assert m["steady_samples_per_second"] > 4 * len(m["step_seconds"][4:]) / 1000


def test_resume_gives_the_same_adapter(cfg_factory, data, tmp_path) -> None:
    """Resumed == uninterrupted, bit for bit. The run is cut into sessions of 2 optimiser steps by the public
    ``train.stop_after_steps`` (a checkpoint mid-epoch, then --resume, again and again); the cut run also loads its
    data in 2 worker processes, so the same proves that workers change nothing (option shuffles, batch order,
    dropout RNG)."""
    cfg = cfg_factory(*LORA, "train.epochs=2", "train.batch_size=6", "train.grad_accum=2", "train.lr=5e-3", "lora.dropout=0.1", "train.option_shuffle=true", "train.num_workers=0")
    straight = train_split(cfg, data[0], data[1].items, tmp_path / "straight", progress=False, log_fn=_quiet)
    cfg.train.num_workers = 2
    cfg.train.stop_after_steps = 2
    said: list[str] = []
    first = train_split(cfg, data[0], data[1].items, tmp_path / "cut", progress=False, log_fn=said.append)
    assert not first.finished and first.steps == 2 and not (tmp_path / "cut" / "last").exists()
    assert any("stopped after 2 steps at step 2 of" in s and "--resume" in s for s in said), said
    from mcvqa.errors import McvqaError

    with pytest.raises(McvqaError, match="--resume"):
        train_split(cfg, data[0], data[1].items, tmp_path / "cut", progress=False, log_fn=_quiet)
    sessions = 1
    while True:
        res = train_split(cfg, data[0], data[1].items, tmp_path / "cut", resume=True, progress=False, log_fn=_quiet)
        sessions += 1
        if res.finished:
            break
        assert res.steps == 2 * sessions and sessions < 10
    assert res.steps == straight.steps and sessions == -(-straight.steps // 2)
    a = load_file(str(tmp_path / "straight" / "last" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical on CPU
    ha = json.loads((tmp_path / "straight" / "metrics.json").read_text())["history"]
    hb = json.loads((tmp_path / "cut" / "metrics.json").read_text())["history"]
    assert ha == hb


def test_kfold_reports_mean_and_std(cfg_factory, synth_data, tmp_path, monkeypatch) -> None:
    import weakref

    from mcvqa.train import loop

    # Each fold's model is freed before the next one loads (its reference cycles were frozen while it trained): one
    # model on the card at a time, in k-fold as in tune's trials.
    built: list[weakref.ref] = []

    def build_model(*a, **k):
        assert all(ref() is None for ref in built), "an earlier fold's model is still alive while the next loads"
        model, processor = real_build(*a, **k)
        built.append(weakref.ref(model))
        return model, processor

    real_build = loop.build_model
    monkeypatch.setattr(loop, "build_model", build_model)
    cfg = cfg_factory(*LORA, "train.kfold=3", "train.epochs=1", "train.batch_size=8")
    res = train(cfg, synth_data / "train.csv", tmp_path / "kf", progress=False, log_fn=_quiet)
    assert len(built) == 3
    summary = json.loads((tmp_path / "kf" / "kfold.json").read_text())
    accs = [json.loads((tmp_path / "kf" / f"fold_{k}" / "metrics.json").read_text())["best"]["accuracy"] for k in range(3)]
    assert [f["accuracy"] for f in summary["folds"]] == accs  # each fold's own best, in fold order
    assert summary["accuracy_mean"] == pytest.approx(np.mean(accs)) and res.best_metrics["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert all((tmp_path / "kf" / f"fold_{k}" / "best" / "adapter_model.safetensors").exists() for k in range(3))


def test_predict_with_trained_adapter(cfg_factory, data, synth_data, tmp_path, capsys) -> None:
    """The adapter folder carries its settings: predict needs only --adapter and --data."""
    cfg = cfg_factory(*LORA, "train.epochs=1", "train.batch_size=8", "image.size=96")
    train_split(cfg, data[0], data[1].items, tmp_path / "t", progress=False, log_fn=_quiet)
    from mcvqa.cli import main

    with pytest.raises(SystemExit) as e:
        main(["predict", "--adapter", str(tmp_path / "t" / "best"), "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "p"), "-q", "--device", "cpu"])
    assert e.value.code == 0, capsys.readouterr().err
    import yaml

    resolved = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())
    assert resolved["image"]["size"] == 96 and resolved["prompt"]["name"] == "plain_ko"


@pytest.mark.parametrize("mode", ["cache", "packed"])
def test_offloaded_checkpoints_train_the_same_step_without_keeping_the_inputs(cfg_factory, data, mode) -> None:
    """``train.offload_checkpoints``: the same loss and every gradient bit for bit as plain checkpointing (LoRA
    dropout on: the recomputation draws the same masks; ``cache``: gradients still reach the prefix's keys and
    values), while the decoder layers' inputs are no longer held between the forward and the backward pass."""
    import weakref

    from mcvqa import families
    from mcvqa.config import load_config
    from mcvqa.errors import ConfigError
    from mcvqa.features import Encoder
    from mcvqa.prompts import load_prompt
    from mcvqa.train import offload
    from mcvqa.train.offload import offload_checkpointed_inputs

    cfg = cfg_factory(*LORA, "lora.dropout=0.3", "train.gradient_checkpointing=true", "prompt.name=fewshot_ko")
    model, processor = build_model(cfg)
    model.train()
    enc = Encoder(processor, load_prompt("fewshot_ko"), cfg.image)
    letters = letter_tokens(processor.tokenizer)
    exs = [enc.encode(it) for it in data[0].items[:5]]
    layers = families.decoder_layers(model)
    results = {}
    fetched_ahead: list[bool] = []
    restore = offload._HostCopy.restore

    def spy(copy):  # did the backward pass start this copy back before it needed it?
        fetched_ahead.append(copy.back is not None)
        return restore(copy)

    for offloaded in (False, True):
        if offloaded:
            assert offload_checkpointed_inputs(model) >= len(layers)  # and the vision blocks transformers checkpoints
        inputs: list[weakref.ref] = []
        hooks = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(weakref.ref(args[0]))) for layer in layers]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss, _ = AnswerLoss(model, enc.prefix_ids, letters.target, shared_prefix=mode)(collate(exs, enc.pad_id))
        held = sum(ref() is not None for ref in inputs)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(offload._HostCopy, "restore", spy)
            loss.backward()
        for h in hooks:
            h.remove()
        results[offloaded] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, held)
    (l0, g0, held0), (l1, g1, held1) = results[False], results[True]
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 0
    assert all(torch.equal(g0[n], g1[n]) for n in g0), [n for n in g0 if not torch.equal(g0[n], g1[n])]
    # every layer's input held by plain checkpointing (the prefix pass's too, in cache mode); offloaded, at most the
    # embeddings' output, which something else keeps
    assert held0 >= len(layers) and held1 <= 1, (held0, held1)
    # the backward pass takes the inputs back last to first, each one fetched while the layer after it recomputes
    assert len(fetched_ahead) >= len(layers) and fetched_ahead.count(False) == 1 and not fetched_ahead[0], fetched_ahead
    from mcvqa.train.offload import offloaded_checkpoint

    built, _ = build_model(cfg_factory(*LORA, "train.gradient_checkpointing=true", "train.offload_checkpoints=true"))
    assert all(layer._gradient_checkpointing_func.func is offloaded_checkpoint for layer in families.decoder_layers(built))
    with pytest.raises(ConfigError, match="needs train.gradient_checkpointing=true"):
        load_config(None, ["train.gradient_checkpointing=false", "train.offload_checkpoints=true"], env=False)


def test_fused_lora_trains_the_same_step_as_peft(cfg_factory, data, monkeypatch) -> None:
    """``lora.fused`` (the default): every LoRA linear adds its update inside one ``torch.addmm``; with dropout drawn in the
    same order, the step's loss and every gradient equal peft's own forward (fp32). A disabled adapter still leaves the
    base model alone."""
    from mcvqa import kernels
    from mcvqa.features import Encoder
    from mcvqa.prompts import load_prompt

    cfg = cfg_factory(*LORA, "lora.dropout=0.3", "train.gradient_checkpointing=true")
    assert cfg.lora.fused
    model, processor = build_model(cfg)
    model.train()
    lora = [m for m in model.modules() if getattr(vars(m).get("forward"), "mcvqa_lora", False)]
    assert len(lora) == model.config.get_text_config().num_hidden_layers * len(cfg.lora.target_modules)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, where the update (and a wrong scale) would vanish
            p.data.normal_(0, 0.05)
    enc = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image)
    batch = collate([enc.encode(it) for it in data[0].items[:4]], enc.pad_id)
    module = AnswerLoss(model, enc.prefix_ids, letter_tokens(processor.tokenizer).target, shared_prefix="packed")
    addmm, calls = torch.addmm, [0]

    def counted(*a, **k):
        calls[0] += 1
        return addmm(*a, **k)

    monkeypatch.setattr(torch, "addmm", counted)
    results = []
    for fused in (True, False):
        if not fused:
            assert kernels.unfuse_lora(model) == len(lora)
        calls[0] = 0
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, _ = module(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        # Each LoRA linear once in the forward and once in its layer's recomputation (checkpointing); none unfused.
        assert calls[0] == (2 * len(lora) if fused else 0)
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    assert g1.keys() == g2.keys() and any("lora_A" in n for n in g1)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)
    kernels.fuse_lora(model)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = module(batch)[1]
        kernels.unfuse_lora(model)
        with model.disable_adapter():
            expected = module(batch)[1]
    torch.testing.assert_close(base, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting, quant, cpu, packs, image_tokens, expected", [
    ("auto", "nf4", False, True, 256, "rows"),  # the recipe on a GPU: packed rows, attended row by row
    ("auto", "none", False, True, 256, "cache"),  # bf16 weights: the cached prefix
    ("auto", "nf4", True, True, 256, "cache"),  # CPU
    ("auto", "nf4", False, False, 256, "cache"),  # a family that cannot pack
    ("auto", "nf4", False, True, 5000, "cache"),  # AnyRes-long images
    ("packed", "none", True, False, 5000, "packed"),  # an explicit setting is obeyed
])
def test_auto_shared_prefix_packs_rows_for_quantised_models_on_a_gpu(setting, quant, cpu, packs, image_tokens, expected) -> None:
    from mcvqa.train.loss import resolve_shared_prefix

    assert resolve_shared_prefix(setting, quant, cpu, packs, image_tokens) == expected
