"""Prompt segments, letter tokens and the scoring forward: batching, padding and the prefix cache are exact."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from mcvqa.data import read_csv
from mcvqa.features import collate
from mcvqa.prompts import load_prompt
from mcvqa.scoring import Scorer, answer_hidden, compute_prefix, letter_tokens, parse_letter


@pytest.fixture()
def items(synth_data):
    return read_csv(synth_data / "train.csv").items[:8]


def test_frame_follows_the_chat_template(encoder, tiny_loaded, items) -> None:
    processor = tiny_loaded[1]
    it = items[0]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": encoder.prompt.system}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": encoder.prompt.user_text(it.question, it.options)}]},
    ]
    assert encoder.full_text(it) == processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("prompt", ["fewshot_ko", "plain_ko", "plain_en"])
def test_segments_tokenize_like_the_whole_string(tiny_loaded, cfg_factory, items, prompt) -> None:
    from mcvqa.features import Encoder

    enc = Encoder(tiny_loaded[1], load_prompt(prompt), cfg_factory().image)
    for it in items:
        ex = enc.encode(it)
        n = len(ex.image_ids) - 2
        image_text = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
        whole = enc.tokenizer.encode(enc.full_text(it, image_text), add_special_tokens=False)
        assert enc.prefix_ids + ex.suffix_ids == whole


@pytest.mark.parametrize("prompt", ["fewshot_ko", "plain_en"])
def test_length_grouping_counts_the_tokens_encoding_makes(tiny_loaded, cfg_factory, items, prompt) -> None:
    """Batches are grouped by ``token_lengths``, counted for all questions in two batched tokenizer calls: each count
    is the suffix an item encodes to (image, question and option tokens), for questions and options of every length,
    an empty option included."""
    import dataclasses

    from mcvqa.features import Encoder, token_lengths

    enc = Encoder(tiny_loaded[1], load_prompt(prompt), cfg_factory().image)
    its = [*items, dataclasses.replace(items[0], question=items[0].question * 5, options=("", "b", "아주 긴 선택지 " * 9, "d"))]
    assert token_lengths(its, enc) == [len(enc.encode(it).suffix_ids) for it in its]


def test_every_letter_resolves(tiny_loaded) -> None:
    letters = letter_tokens(tiny_loaded[1].tokenizer)
    tok = tiny_loaded[1].tokenizer
    for letter, forms, target in zip("abcd", letters.variants, letters.target):
        assert forms and target in forms
        assert tok.decode([target]) == letter
        assert all(tok.decode([f]).strip().lower() == letter for f in forms)


def test_probabilities_sum_to_one(tiny_loaded, encoder, items) -> None:
    scorer = Scorer(tiny_loaded[0], encoder)
    batch = collate([encoder.encode(it) for it in items], encoder.pad_id)
    p = scorer.logprobs(batch).exp()
    assert p.shape == (len(items), 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(len(items)), atol=1e-6, rtol=0)


def _long_short(encoder, items):
    """Examples of clearly different lengths so batching must pad."""
    exs = [encoder.encode(it) for it in items]
    long = dataclasses.replace(items[1], question=items[1].question + " 그리고 아주 길게 덧붙인 설명이 있는 질문입니다" * 3)
    exs.append(encoder.encode(long))
    assert len({len(e.suffix_ids) for e in exs}) > 2
    return exs


@pytest.mark.parametrize("cache", [True, False])
def test_batched_equals_one_at_a_time(tiny_loaded, encoder, items, cache) -> None:
    scorer = Scorer(tiny_loaded[0], encoder, prefix_cache=cache)
    prefix = None if cache else encoder.prefix_ids
    exs = _long_short(encoder, items)
    batched = scorer.logprobs(collate(exs, encoder.pad_id, prefix))
    single = torch.cat([scorer.logprobs(collate([e], encoder.pad_id, prefix)) for e in exs])
    torch.testing.assert_close(batched.exp(), single.exp(), atol=1e-4, rtol=0)


def test_cached_prefix_equals_full_sequence(tiny_loaded, encoder, items) -> None:
    model = tiny_loaded[0]
    exs = _long_short(encoder, items)
    suffix_batch = collate(exs, encoder.pad_id)
    full_batch = collate(exs, encoder.pad_id, encoder.prefix_ids)
    with torch.no_grad():
        cached = answer_hidden(model, suffix_batch, compute_prefix(model, encoder.prefix_ids))
        full = answer_hidden(model, full_batch, None)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    a = Scorer(model, encoder, prefix_cache=True).logprobs(suffix_batch)
    b = Scorer(model, encoder, prefix_cache=False).logprobs(full_batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_padding_does_not_move_the_answer(tiny_loaded, encoder, items) -> None:
    scorer = Scorer(tiny_loaded[0], encoder)
    batch = collate([encoder.encode(it) for it in items], encoder.pad_id)
    extra = 37
    padded = dataclasses.replace(
        batch,
        input_ids=torch.nn.functional.pad(batch.input_ids, (0, extra), value=encoder.pad_id),
        mm_token_type_ids=torch.nn.functional.pad(batch.mm_token_type_ids, (0, extra), value=0),
    )
    torch.testing.assert_close(scorer.logprobs(batch), scorer.logprobs(padded), atol=1e-5, rtol=0)


def test_answer_position_is_the_generation_prompt(encoder, items) -> None:
    ex = encoder.encode(items[0])
    tail = encoder.tokenizer.decode(ex.option_ids[-4:])
    assert tail.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "text,expected",
    [("b", 1), (" C", 2), ("정답은 d 입니다", 3), ("(a)", 0), ("about", None), ("", None), ("A) 사과", 0)],
)
def test_parse_letter(text, expected) -> None:
    assert parse_letter(text) == expected


def test_shared_question_prefix_for_option_orders_is_exact(tiny_loaded, encoder, items) -> None:
    """Scoring 4 cyclic orders with one shared image+question pass equals scoring each permuted question alone."""
    from mcvqa.features import cyclic_orders

    scorer = Scorer(tiny_loaded[0], encoder)
    its = list(items[:4]) + [dataclasses.replace(items[4], question=items[4].question + " 조금 더 긴 질문")]
    orders = cyclic_orders(4)
    shared = scorer.logprobs_orders([encoder.encode_orders(it, orders) for it in its])
    assert shared.shape == (len(its), 4, 4)
    for v, order in enumerate(orders):
        perm = [it.permuted(order) for it in its]
        alone = scorer.logprobs(collate([encoder.encode(p) for p in perm], encoder.pad_id))
        # alone[:, j] is the option shown at letter j = original option order[j]
        torch.testing.assert_close(shared[:, v, list(order)], alone, atol=1e-5, rtol=0)


def test_batched_vision_attention_equals_per_image_loop(tiny_loaded) -> None:
    """mcvqa runs the vision tower's attention once per group of equal-size images instead of once per image."""
    from PIL import Image

    from mcvqa.kernels import VISION_ATTENTION
    from mcvqa.families import core_and_head

    model, processor = tiny_loaded
    core = core_and_head(model)[0]
    assert core.visual.config._attn_implementation == VISION_ATTENTION
    images = [Image.new("RGB", (64, 64), (40 * i, 90, 200)) for i in range(3)] + [Image.effect_noise((96, 64), 40).convert("RGB")]
    px = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        fast = core.visual(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
        core.visual.config._attn_implementation = "sdpa"
        try:
            stock = core.visual(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
        finally:
            core.visual.config._attn_implementation = VISION_ATTENTION
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=0)


# "layers" compiles whole decoder layers: 36 s of inductor on 2 CPU cores for what "mlp" proves in 3 s (the same
# compile_blocks path); it is a GPU option, timed and checked in bench/gpu_bench.py --compile layers.
@pytest.mark.parametrize("scope", ["mlp"])
def test_compiled_blocks_score_like_eager(cfg_factory, encoder, items, scope) -> None:
    """Dynamo traces the decoder layers with the read-only prefix cache; the "eager" backend keeps CPU tests
    fast and isolates tracing (the GPU's inductor kernels are checked by bench/gpu_bench.py --compile)."""
    from mcvqa.model import load_model
    from mcvqa.kernels import compile_blocks
    from mcvqa.families import core_and_head

    model, _ = load_model(cfg_factory().model)  # compile works in place: not the shared session model
    exs = _long_short(encoder, items)
    batch = collate(exs, encoder.pad_id)
    before = Scorer(model, encoder).logprobs(batch)
    assert compile_blocks(core_and_head(model)[0], scope, backend="eager") > 0
    after = Scorer(model, encoder).logprobs(batch)
    shorter = Scorer(model, encoder).logprobs(collate(exs[:3], encoder.pad_id))  # another shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(shorter, before[:3], atol=1e-4, rtol=0)


def test_vision_tower_on_a_host_grid_equals_transformers_forward(tiny_loaded) -> None:
    """The grid-derived tensors computed once on the host (and cached per grid), ``cu_seqlens`` kept there, one
    attention call per run of equal-size images and the patch embedding as a matrix product: the same image
    features and DeepStack features as transformers' own forward (its helpers, its per-image SDPA, its Conv3d),
    for a letterboxed batch and then a mixed one (which must not reuse the first one's cached tensors)."""
    from PIL import Image

    from conftest import assert_vision_like_stock
    from mcvqa.families import core_and_head

    model, processor = tiny_loaded
    visual = core_and_head(model)[0].visual
    same = [Image.new("RGB", (64, 64), (40 * i, 90, 200)) for i in range(3)]
    mixed = same[:1] + [Image.effect_noise((96, 64), 40).convert("RGB")] + same[2:]  # as many images, another grid
    for images in (same, mixed, same):
        px = processor.image_processor(images=images, return_tensors="pt")
        assert_vision_like_stock(visual, px["pixel_values"], px["image_grid_thw"])


def test_a_moved_batch_reads_positions_and_grids_from_its_host_copy(tiny_loaded, encoder, items) -> None:
    """``Batch.to`` keeps the CPU batch it came from, and ``rows`` cuts that copy too (the out-of-memory halves):
    scoring a moved half equals scoring the half of the CPU batch."""
    scorer = Scorer(tiny_loaded[0], encoder)
    exs = _long_short(encoder, items)
    batch = collate(exs, encoder.pad_id)
    moved = batch.to("cpu")
    assert moved.host is batch and moved.rows(1, 3).host is not None
    torch.testing.assert_close(scorer.logprobs(moved.rows(1, 3)), scorer.logprobs(batch.rows(1, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(scorer.logprobs(moved.rows(0, 2)), scorer.logprobs(collate(exs[:2], encoder.pad_id)), atol=1e-5, rtol=0)


@contextlib.contextmanager
def _no_tensor_from_host_data():
    """Records every tensor made from Python or NumPy data inside the block (``torch.tensor`` and the like): on a
    GPU each is a copy from pageable memory, which waits for all the work already queued."""
    from torch.overrides import TorchFunctionMode

    made: list[str] = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.as_tensor, torch.from_numpy):
                made.append(f"{func.__name__}{args}")
            return func(*args, **(kwargs or {}))

    with Spy():
        yield made


def test_merging_image_features_without_waits_is_transformers_merge(tiny_loaded, encoder, items) -> None:
    """The placeholder check asserted on the device after a first checked forward, and DeepStack as a gather added
    to the hidden states: the production load applies it, the letter scores equal transformers' merge bit for bit,
    and so do DeepStack's sum in bf16 (signed zeros included) and its gradients. A feature count that disagrees with
    the image tokens gets transformers' readable error on the first forward, the device's assert after it."""
    from mcvqa.families import core_and_head
    from mcvqa.kernels import merge_without_sync, restore_merge

    core = core_and_head(tiny_loaded[0])[0]
    assert core.merges_without_sync and "_deepstack_process" in vars(core.language_model)
    batch = collate(_long_short(encoder, items), encoder.pad_id)
    scorer = Scorer(tiny_loaded[0], encoder)
    first, ours = scorer.logprobs(batch), scorer.logprobs(batch)  # transformers' check, then the device's
    restore_merge(core)
    try:
        assert "get_placeholder_mask" not in vars(core)
        stock = Scorer(tiny_loaded[0], encoder).logprobs(batch)
    finally:
        assert merge_without_sync(core)
    assert torch.equal(ours, stock) and torch.equal(first, stock)

    text = core.language_model
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 9, generator=g) < 0.4
    hidden = torch.randn(2, 9, 16, generator=g).bfloat16()
    hidden[(~mask).nonzero()[0].tolist()] = -0.0  # a text position: transformers keeps its sign
    hidden.requires_grad_()
    embeds = torch.randn(int(mask.sum()), 16, generator=g).bfloat16().requires_grad_()
    with _no_tensor_from_host_data() as made:  # on a GPU each would be a copy the host waits for
        out = text._deepstack_process(hidden, mask, embeds)
        core.get_placeholder_mask(batch.input_ids, torch.zeros(*batch.input_ids.shape, 8), image_features=torch.zeros(int((batch.input_ids == core.config.image_token_id).sum()), 8))
    assert made == []
    ref = type(text)._deepstack_process(text, hidden, mask, embeds)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16)) and not torch.equal(out, hidden)
    up = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, (hidden, embeds), up)
    ref_grads = torch.autograd.grad(ref, (hidden, embeds), up)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))

    ids = batch.input_ids
    embeds = torch.zeros(*ids.shape, 8)
    n = int((ids == core.config.image_token_id).sum())
    restore_merge(core)
    assert merge_without_sync(core)  # a fresh merge: its first forward with features is transformers' check
    with pytest.raises(ValueError, match="do not match"):
        core.get_placeholder_mask(ids, embeds, image_features=torch.zeros(n - 1, 8))
    image_mask, _ = core.get_placeholder_mask(ids, embeds, image_features=torch.zeros(n, 8))
    assert torch.equal(image_mask[..., 0], ids == core.config.image_token_id)
    image_mask, video_mask = core.get_placeholder_mask(ids, embeds, image_features=torch.zeros(n, 8))  # the device's
    assert torch.equal(image_mask[..., 0], ids == core.config.image_token_id) and not video_mask.any()
    with pytest.raises(RuntimeError, match="image tokens and image features disagree"):
        core.get_placeholder_mask(ids, embeds, image_features=torch.zeros(n - 1, 8))


def test_image_tensors_cast_in_the_workers_score_like_the_processors(cfg_factory, items) -> None:
    """A bf16 model's encoder casts the pixels to bf16 where they are made (half the bytes to pin and copy): the
    patch embedding's first step casts them to bf16 anyway, so the scores are the fp32 pixels' bit for bit."""
    from mcvqa.features import Encoder
    from mcvqa.predict import build_scorer

    scorer = build_scorer(cfg_factory("model.dtype=bf16"))
    enc = scorer.encoder
    assert enc.pixel_dtype == torch.bfloat16
    cast = [enc.encode(it) for it in items[:4]]
    assert all(v.dtype == torch.bfloat16 for ex in cast for k, v in ex.vision.items() if k == "pixel_values")
    twin = Encoder(enc.processor, enc.prompt, enc.image_cfg, enc.family)
    kept = [twin.encode(it) for it in items[:4]]
    assert kept[0].vision["pixel_values"].dtype == torch.float32
    assert torch.equal(scorer.logprobs(collate(cast, enc.pad_id)), scorer.logprobs(collate(kept, enc.pad_id)))


def test_a_lora_on_the_patch_embedding_is_used_and_keeps_fp32_pixels(cfg_factory) -> None:
    """With ``lora.vision`` peft wraps the patch embedding's Conv3d too: the matrix-product rewrite must then run
    the wrapper (not the bare convolution it captured at load), and the pixels stay as the processor made them."""
    from PIL import Image

    from mcvqa.families import core_and_head, for_model
    from mcvqa.model import attach_lora, load_model

    cfg = cfg_factory("lora.vision=true")
    model = attach_lora(load_model(cfg.model)[0], cfg.lora)
    core = core_and_head(model)[0]
    wrapped = core.visual.patch_embed.proj
    assert not isinstance(wrapped, torch.nn.Conv3d) and for_model(model).pixel_dtype(core) is None
    torch.nn.init.normal_(wrapped.lora_B["default"].weight)
    px = torch.randn(16, wrapped.base_layer.weight[0].numel())
    with torch.no_grad():
        adapted = core.visual.patch_embed(px)
        with model.disable_adapter():
            base = core.visual.patch_embed(px)
    assert not torch.allclose(adapted, base)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_layer_at_the_answers_only_scores_and_trains_as_the_whole_layer(cfg_factory, synth_data, monkeypatch, checkpointing) -> None:
    """Qwen3-VL's last decoder layer runs its queries, attention output, norm and MLP at the answer positions only
    (kernels.answer_only_last_layer): the same letter probabilities (cached prefix, option orders in one row) and the
    same training loss and gradients (packed rows, dense mask, cached prefix; checkpointed or not) as the whole layer."""
    from mcvqa import families, kernels
    from mcvqa.data import read_csv
    from mcvqa.features import Encoder, collate
    from mcvqa.prompts import load_prompt
    from mcvqa.scoring import Scorer, letter_tokens
    from mcvqa.train import AnswerLoss, build_model

    cfg = cfg_factory("train.method=lora", "lora.r=4", "lora.dropout=0.0", "prompt.name=fewshot_ko",
                      f"train.gradient_checkpointing={str(checkpointing).lower()}")
    model, processor = build_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    last = families.decoder_layers(model)[-1]
    assert last.answers_only
    enc = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image)
    items = read_csv(synth_data / "train.csv", require_answer=True).items[:5]
    exs = [enc.encode(it) for it in items]
    batch = collate(exs, enc.pad_id)
    calls = [0]
    trimmed = kernels._answers_only

    def counted(*a, **k):
        calls[0] += 1
        return trimmed(*a, **k)

    monkeypatch.setattr(kernels, "_answers_only", counted)
    results = []
    for whole in (False, True):
        if whole:  # the class's own forward back on the last layer
            del last.forward
            last.answers_only = False
        calls[0] = 0
        model.eval()
        scorer = Scorer(model, enc)
        with torch.no_grad():
            lp = scorer.logprobs(batch)
            orders = scorer.logprobs_orders([enc.encode_orders(it, [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]) for it in items[:3]])
        model.train()
        grads = {}
        for mode in ("rows", "packed", "cache"):
            model.zero_grad(set_to_none=True)
            loss, _ = AnswerLoss(model, enc.prefix_ids, letter_tokens(processor.tokenizer).target, shared_prefix=mode)(batch)
            loss.backward()
            grads[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        # the answer-only layer ran in each of the five forwards above (plus once per checkpointed recomputation)
        assert calls[0] == (0 if whole else 5 + 3 * checkpointing), calls
        results.append((lp, orders, grads))
    (lp1, or1, g1), (lp2, or2, g2) = results
    torch.testing.assert_close(lp1, lp2, atol=1e-5, rtol=0)
    torch.testing.assert_close(or1, or2, atol=1e-5, rtol=0)
    for mode in g1:
        torch.testing.assert_close(g1[mode][0], g2[mode][0], atol=1e-5, rtol=0)
        assert g1[mode][1].keys() == g2[mode][1].keys() and len(g1[mode][1]) > 0
        for n in g1[mode][1]:
            torch.testing.assert_close(g1[mode][1][n], g2[mode][1][n], atol=1e-5, rtol=1e-4, msg=f"{mode} {n}")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_prefix_rows_kept_between_batches_score_as_the_concatenation(tiny_loaded, encoder, items, mode) -> None:
    """Prediction's scorer keeps the prefix laid out per row (``PrefixRows``) and writes only each batch's keys and
    values after it: batches that shrink, grow in rows and grow in length (new buffers) score as the concatenating
    scorer does, under ``no_grad`` (as predict runs) and in inference mode, and the buffers are reused while a batch
    fits them (the prefix written once, not once per batch)."""
    model = tiny_loaded[0]
    exs = sorted(_long_short(encoder, items), key=lambda e: len(e.suffix_ids))[:-1]
    longer = dataclasses.replace(items[2], question=items[2].question + " 그리고 아주 길게 덧붙인 설명이 있는 질문입니다" * 12)
    batches = [exs[:3], exs[:2], exs[:5], [*exs[-2:], encoder.encode(longer)]]  # shrink, more rows, longer rows
    kept, plain = Scorer(model, encoder, keep_rows=True), Scorer(model, encoder)
    shapes, pointers = [], []
    with getattr(torch, mode)():
        for exs_b in batches:
            batch = collate(exs_b, encoder.pad_id)
            torch.testing.assert_close(kept.logprobs(batch), plain.logprobs(batch), atol=1e-6, rtol=0)
            prefix = kept.prefix()
            keys = prefix.rows.keys[0]
            shapes.append(tuple(keys.shape))
            pointers.append(keys.data_ptr())
            pk = prefix.states[0][0]
            torch.testing.assert_close(keys[: len(exs_b), :, : prefix.length], pk.expand(len(exs_b), -1, -1, -1), atol=0, rtol=0)
    assert plain.prefix().rows is None
    assert all(k is not None for k, kind in zip(prefix.rows.keys, prefix.kinds) if kind == "kv")
    assert pointers[0] == pointers[1]  # the smaller batch fitted the first one's buffers: no new ones, no prefix copy
    assert shapes[2][0] == 5 > shapes[1][0] and shapes[3][-2] > shapes[2][-2]  # more rows, then longer rows: new ones


def test_prefix_rows_stay_out_of_gradients_and_out_of_a_full_device(tiny_loaded, encoder, items, monkeypatch) -> None:
    """With gradients (test-time adaptation) the scorer concatenates and the prefix's gradient is the concatenating
    scorer's. Without room for every layer's buffers it concatenates too, and says no once rather than per batch;
    without room for a larger buffer later, or when a forward runs out of memory, the buffers are given back and the
    scores stay the concatenation's."""
    from mcvqa import scoring
    from mcvqa.scoring import PrefixRows

    model = tiny_loaded[0]
    batch = collate([encoder.encode(it) for it in items[:4]], encoder.pad_id)
    plain = Scorer(model, encoder)
    got = {}
    for name in ("kept", "plain"):
        prefix = compute_prefix(model, encoder.prefix_ids)  # with gradients: what adapting the weights scores through
        if name == "kept":
            prefix.rows = PrefixRows(prefix.kinds)
        keys = prefix.states[0][0]
        keys.retain_grad()
        answer_hidden(model, batch, prefix).square().sum().backward()
        got[name] = keys.grad.clone()
        if name == "kept":
            assert all(k is None for k in prefix.rows.keys)
    torch.testing.assert_close(got["kept"], got["plain"], atol=1e-6, rtol=0)

    asked = []
    monkeypatch.setattr(PrefixRows, "_room", lambda self, like, need: asked.append(need) or False)
    full = Scorer(model, encoder, keep_rows=True)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(full.logprobs(batch), plain.logprobs(batch), atol=1e-6, rtol=0)
    assert all(k is None for k in full.prefix().rows.keys) and full.prefix().rows.declined
    assert len(asked) == 1 and asked[0] > 0

    # Room for the first buffers, none for the longer ones a later batch needs: given back, still exact.
    room = {"left": True}
    monkeypatch.setattr(PrefixRows, "_room", lambda self, like, need: room["left"])
    later = Scorer(model, encoder, keep_rows=True)
    longer = collate([encoder.encode(dataclasses.replace(it, question=it.question + " 덧붙인 설명" * 40)) for it in items[:4]], encoder.pad_id)
    with torch.no_grad():
        later.logprobs(batch)
        assert later.prefix().rows.keys[0] is not None
        room["left"] = False
        torch.testing.assert_close(later.logprobs(longer), plain.logprobs(longer), atol=1e-6, rtol=0)
    assert later.prefix().rows.declined and all(k is None for k in later.prefix().rows.keys)

    # A forward that runs out of memory gives the buffers back before the engine halves the batch.
    monkeypatch.setattr(PrefixRows, "_room", lambda self, like, need: True)
    oom = Scorer(model, encoder, keep_rows=True)
    real = scoring.answer_hidden
    with torch.no_grad():
        oom.logprobs(batch)
        assert oom.prefix().rows.keys[0] is not None
        monkeypatch.setattr(scoring, "answer_hidden", lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory")))
        with pytest.raises(torch.cuda.OutOfMemoryError):
            oom.logprobs(batch)
        monkeypatch.setattr(scoring, "answer_hidden", real)
        torch.testing.assert_close(oom.logprobs(batch), plain.logprobs(batch), atol=1e-6, rtol=0)
    assert oom.prefix().rows.declined and all(k is None for k in oom.prefix().rows.keys)
