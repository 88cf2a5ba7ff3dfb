"""The speed levers of issue 26, proven on CPU: fused kernels change no number (their wiring, with transformers'
arithmetic standing in for Liger's GPU kernels), FP8 computes the quantised product it claims and touches only the
language model's projections, and fused gradient accumulation trains the same adapter as separate micro-batches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcvqa import fp8, kernels
from mcvqa.config import ModelConfig
from mcvqa.data import read_csv, stratified_split
from mcvqa.errors import McvqaError, ModelError
from mcvqa.families import core_and_head, for_model
from mcvqa.model import fuse_kernels
from mcvqa.scoring import Scorer

LORA = ["train.method=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.report_to=[]", "prompt.name=plain_ko"]


def _restore_rope(model, monkeypatch) -> None:
    core = core_and_head(model)[0]
    namespace = sys.modules[type(core.language_model.layers[0].self_attn).__module__]
    monkeypatch.setattr(namespace, "apply_rotary_pos_emb", namespace.apply_rotary_pos_emb)  # undone after the test
    vision = sys.modules[type(core.visual.blocks[0].attn).__module__]
    monkeypatch.setattr(vision, "apply_rotary_pos_emb_vision", vision.apply_rotary_pos_emb_vision)


def test_fused_kernels_on_qwen3_vl_change_no_probability(cfg_factory, encoder, synth_data, monkeypatch) -> None:
    """Every RMSNorm (input, post-attention, q/k norms, final), every SwiGLU MLP and RoPE rerouted, same numbers."""
    from mcvqa.model import load_model

    cfg = cfg_factory()
    model, _ = load_model(cfg.model)
    items = read_csv(synth_data / "test.csv").items[:6]
    batch = encoder.collate([encoder.encode(it) for it in items])
    with torch.no_grad():
        before = Scorer(model, encoder).logprobs(batch).exp()
    _restore_rope(model, monkeypatch)
    fused = fuse_kernels(model, cfg.model, for_model(model), ops=kernels.TORCH_OPS)
    core = core_and_head(model)[0]
    layers = len(core.language_model.layers)
    assert fused == {"rms_norm": 4 * layers + 1, "swiglu": layers, "rope": layers, "vision_rope": len(core.visual.blocks)}
    vision = sys.modules[type(core.visual.blocks[0].attn).__module__]
    assert getattr(vision.apply_rotary_pos_emb_vision, "_mcvqa_fused", False)  # the tower's attention calls the wrapper
    with torch.no_grad():
        after = Scorer(model, encoder).logprobs(batch).exp()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_fused_vision_rope_is_transformers_rotation_in_bf16() -> None:
    """The vision wrapper on the strided q/k a fused qkv projection gives, in bf16 with fp32 tables: bit for bit
    transformers' rotation (computed in fp32, cast back), in the layout and dtype the attention expects (the wiring,
    with transformers' arithmetic in the kernel's place; on a GPU Liger's kernel may round differently)."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as m

    torch.manual_seed(0)
    patches, heads, d = 40, 3, 12
    qkv = torch.randn(patches, 3, heads, d).to(torch.bfloat16).permute(1, 0, 2, 3)
    q, k = qkv[0], qkv[1]  # not contiguous, as in the tower
    freqs = torch.randn(patches, d // 2) * 3
    emb = torch.cat((freqs, freqs), dim=-1)
    wrapped = kernels._vision_rope_wrapper(kernels.TORCH_OPS, m.apply_rotary_pos_emb_vision)
    want = m.apply_rotary_pos_emb_vision(q, k, emb.cos(), emb.sin())
    got = wrapped(q, k, emb.cos(), emb.sin())
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and g.shape == (patches, heads, d)
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    # Liger reads only the tables' left half, and the CPU restatement does the same: tables with unequal halves
    # (which no Qwen tower makes) must not match, so the wiring tests would catch a model that made them.
    uneven = torch.randn(patches, d) * 3
    assert not torch.equal(wrapped(q, k, uneven.cos(), uneven.sin())[0], m.apply_rotary_pos_emb_vision(q, k, uneven.cos(), uneven.sin())[0])

    class _OnCpuRefuses(kernels.FusedOps):
        runs_on_cpu = True

        @staticmethod
        def rope(*_a, **_k):
            raise AssertionError("a table that is not one row per patch reached the kernel")

    # A broadcast table (one row for every patch) is transformers' business: the kernel indexes rows by position.
    one_row = emb[:1]
    guarded = kernels._vision_rope_wrapper(_OnCpuRefuses(), m.apply_rotary_pos_emb_vision)
    for g, w in zip(guarded(q, k, one_row.cos(), one_row.sin()), m.apply_rotary_pos_emb_vision(q, k, one_row.cos(), one_row.sin())):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_a_load_without_fused_kernels_undoes_an_earlier_loads_rope_swap(cfg_factory, monkeypatch) -> None:
    """The RoPE swaps live in transformers' module namespaces, for the whole process: the last load's model.kernels
    holds (a benchmark or a tuning study loads several models in turn), and swaps never nest."""
    from mcvqa.model import load_model

    model, _ = load_model(cfg_factory().model)  # its own copy: fusing rewires the model's modules too
    _restore_rope(model, monkeypatch)
    core = core_and_head(model)[0]
    text = sys.modules[type(core.language_model.layers[0].self_attn).__module__]
    vision = sys.modules[type(core.visual.blocks[0].attn).__module__]
    originals = (text.apply_rotary_pos_emb, vision.apply_rotary_pos_emb_vision)
    family = for_model(model)
    for _ in range(2):  # fused twice: one wrapper around transformers' function, not a wrapper of a wrapper
        fuse_kernels(model, ModelConfig(kernels="liger", device="cpu"), family, ops=kernels.TORCH_OPS)
    fused = (text.apply_rotary_pos_emb, vision.apply_rotary_pos_emb_vision)
    assert all(f is not o and f._mcvqa_original is o for f, o in zip(fused, originals))
    assert fuse_kernels(model, ModelConfig(kernels="off"), family, ops=kernels.TORCH_OPS) == {}
    assert (text.apply_rotary_pos_emb, vision.apply_rotary_pos_emb_vision) == originals


def test_fused_vision_rope_leaves_remote_code_towers_alone(monkeypatch) -> None:
    """A checkpoint's own code may name its file modeling_qwen2_vl with other tables: only transformers' modules
    are rewired."""
    import types

    for name, reached in (("transformers_modules.someone.modeling_qwen2_vl", 0), ("transformers.models.qwen2_vl.modeling_qwen2_vl", 1)):
        namespace = types.ModuleType(name)
        namespace.apply_rotary_pos_emb_vision = lambda q, k, cos, sin: (q, k)
        attn_class = type("Attention", (), {"__module__": name})
        monkeypatch.setitem(sys.modules, name, namespace)
        tower = types.SimpleNamespace(blocks=[types.SimpleNamespace(attn=attn_class())])
        assert kernels.fuse_vision_rope(tower, kernels.TORCH_OPS) == reached, name
        assert getattr(namespace.apply_rotary_pos_emb_vision, "_mcvqa_fused", False) == bool(reached), name


class _Refuses(kernels.FusedOps):
    """Stands in for Liger on a machine without a GPU: must never be called on CPU tensors."""

    name = "refuses"
    runs_on_cpu = False

    @staticmethod
    def rms_norm(*_a, **_k):
        raise AssertionError("a GPU kernel ran on a CPU tensor")

    silu_mul = rope = rms_norm


def test_gpu_kernels_leave_cpu_tensors_to_the_model(cfg_factory, encoder, synth_data, monkeypatch) -> None:
    from mcvqa.model import load_model

    model, _ = load_model(cfg_factory().model)
    batch = encoder.collate([encoder.encode(it) for it in read_csv(synth_data / "test.csv").items[:3]])
    with torch.no_grad():
        before = Scorer(model, encoder).logprobs(batch)
    _restore_rope(model, monkeypatch)
    core = core_and_head(model)[0]
    kernels.fuse(core.language_model, _Refuses(), norm_offset=0.0, rope=True)
    assert kernels.fuse_vision_rope(core.visual, _Refuses()) == len(core.visual.blocks)
    with torch.no_grad():
        torch.testing.assert_close(Scorer(model, encoder).logprobs(batch), before, atol=0, rtol=0)


def test_kernels_setting(tiny_loaded, monkeypatch) -> None:
    """off and families without a declared norm: nothing; auto without liger-kernel: quietly nothing; liger without
    it: a one-line error; Liger on a CPU model: nothing (its kernels are CUDA's)."""
    model, _ = tiny_loaded
    family = for_model(model)
    assert fuse_kernels(model, ModelConfig(kernels="off"), family, ops=kernels.TORCH_OPS) == {}
    monkeypatch.setattr(kernels, "liger_ops", lambda: None)
    assert fuse_kernels(model, ModelConfig(kernels="auto"), family) == {}
    with pytest.raises(ModelError, match="model.kernels=liger needs liger-kernel"):
        fuse_kernels(model, ModelConfig(kernels="liger"), family)
    monkeypatch.setattr(kernels, "liger_ops", lambda: _Refuses())
    assert fuse_kernels(model, ModelConfig(kernels="liger"), family) == {}


# ------------------------------------------------------------------------------------------ fp8


def test_fp8_linear_is_the_row_wise_quantised_product() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64) * torch.linspace(0.1, 10, 64)  # rows and columns of very different size
    q = fp8.Fp8Linear(lin)
    assert q.weight.dtype == fp8.FP8 and q.weight_scale.shape == (1, 48)
    qx, sx = fp8.quantize_rows(x.reshape(-1, 64))
    qw, sw = fp8.quantize_rows(lin.weight.detach())
    # Every row is scaled so that its largest entry lands on the format's largest value.
    assert torch.equal(qx.float().abs().amax(-1), torch.full((35,), fp8.FP8_MAX))
    expected = (qx.float() * sx) @ (qw.float() * sw).t() + lin.bias.detach()
    with torch.no_grad():
        got = q(x)
    assert got.shape == (5, 7, 48)
    torch.testing.assert_close(got.reshape(-1, 48), expected, atol=1e-5, rtol=1e-5)
    exact = lin(x).detach()
    assert ((got - exact).norm() / exact.norm()).item() < 0.05  # e4m3 keeps 3 mantissa bits: a few percent at most


def test_fp8_converts_only_the_language_models_projections(tmp_path) -> None:
    """InternVL: its vision tower names its projections q_proj/k_proj/v_proj like the language model's."""
    from mcvqa.cli import main
    from mcvqa.model import load_model, to_fp8

    with pytest.raises(SystemExit):
        main(["tiny", "--arch", "internvl", "--out", str(tmp_path / "internvl")])
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "internvl"), device="cpu", dtype="fp32"))
    family = for_model(model)
    core, head = core_and_head(model)
    text = family.text_model(core)
    assert to_fp8(model, family) == 7 * len(text.layers)
    outside = [n for n, m in model.named_modules() if isinstance(m, fp8.Fp8Linear) and not n.startswith("model.language_model.")]
    assert outside == [] and type(head) is torch.nn.Linear
    assert any(type(m) is torch.nn.Linear and n.endswith("q_proj") for n, m in core.vision_tower.named_modules())


def test_fp8_refused_where_it_does_not_run(cfg_factory, tmp_path) -> None:
    from mcvqa.model import load_model, save_quantized
    from mcvqa.train import build_model

    cfg = cfg_factory("model.quant=fp8")
    with pytest.raises(ModelError, match="fp8 needs a GPU with FP8 matrix units"):
        load_model(cfg.model)
    with pytest.raises(McvqaError, match="fp8 is for prediction"):
        build_model(cfg)
    with pytest.raises(ModelError, match="nf4 or int8 checkpoints"):
        save_quantized(cfg.model, tmp_path / "q")


# ------------------------------------------------------------------------------------------ fused accumulation


def test_step_units_fuse_equal_micro_batches_only() -> None:
    from mcvqa.train.loop import step_units

    b = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert step_units(b, 2, fuse=True) == [([0, 1, 2, 3], 0, 2), ([4, 5, 6, 7], 2, 2), ([8], 4, 1)]
    ragged = [[0, 1], [2, 3], [4, 5], [6]]
    assert step_units(ragged, 2, fuse=True) == [([0, 1, 2, 3], 0, 2), ([4, 5], 2, 1), ([6], 3, 1)]
    assert step_units(b, 2, fuse=False) == [([0, 1], 0, 1), ([2, 3], 1, 1), ([4, 5], 2, 1), ([6, 7], 3, 1), ([8], 4, 1)]
    assert step_units(b, 3, fuse=True) == [([0, 1, 2, 3, 4, 5], 0, 3), ([6, 7], 3, 1), ([8], 4, 1)]


def test_fused_accumulation_trains_the_same_adapter(cfg_factory, synth_data, tmp_path) -> None:
    """One pass over batch x accumulation rows per optimiser step == the micro-batches one by one (same steps, same
    data order, same mean loss), including an epoch whose last step is ragged; and a checkpoint written by a fused
    run resumes unfused to the same end."""
    from mcvqa.train import train_split

    train_items, _ = stratified_split(read_csv(synth_data / "train.csv", require_answer=True), 0.25, 0)
    items = train_items.items[:22]  # 22 rows, batch 4, accumulation 2: 6 micro-batches, the last of 2 rows
    quiet = lambda *_: None  # noqa: E731

    def cfg(fuse: str, *extra: str):
        return cfg_factory(*LORA, "train.epochs=2", "train.batch_size=4", "train.grad_accum=2", "train.lr=1e-2",
                           "train.eval_every=never", f"train.fuse_accumulation={fuse}", *extra)

    def adapter(run: str) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / "last" / "adapter_model.safetensors"))

    for fuse in ("on", "off"):
        train_split(cfg(fuse), items, [], tmp_path / fuse, progress=False, log_fn=quiet)
    train_split(cfg("on", "train.stop_after_steps=4"), items, [], tmp_path / "cut", progress=False, log_fn=quiet)
    train_split(cfg("off"), items, [], tmp_path / "cut", resume=True, progress=False, log_fn=quiet)
    on = adapter("on")
    assert on and sum(float(v.abs().sum()) for k, v in on.items() if "lora_B" in k) > 0  # B starts at zero: trained
    for other in ("off", "cut"):
        got = adapter(other)
        assert got.keys() == on.keys()
        for k in on:
            torch.testing.assert_close(got[k], on[k], atol=1e-5, rtol=1e-4, msg=f"{other}: {k}")

    def step_losses(run: str) -> torch.Tensor:  # each optimiser step's logged loss: the mean over its rows
        import json

        return torch.tensor([loss for _, loss in json.loads((tmp_path / run / "metrics.json").read_text())["losses"]])

    assert len(step_losses("on")) == 6
    torch.testing.assert_close(step_losses("off"), step_losses("on"), atol=1e-5, rtol=1e-4)


def test_liger_vendor_backend_warnings_are_dropped_and_every_other_warning_kept(caplog) -> None:
    """Liger probes vendor backends (CUTLASS's Python DSL, Ascend NPUs) at its first dispatch and warns on every GPU run
    that they could not be imported, though its Triton kernels (mcvqa's) run fine: loading the kernels drops exactly
    those warnings, once, and leaves a failing Triton kernel's and every other warning visible."""
    import logging

    from mcvqa import kernels

    kernels.liger_ops()  # installs the filter whether or not liger-kernel is installed
    kernels.liger_ops()
    log = logging.getLogger("liger_kernel.backends.registry")
    assert sum(isinstance(f, kernels._OptionalLigerBackends) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING, logger="liger_kernel.backends.registry"):
        for path in ("liger_kernel.ops.backends._cutedsl.rope", "liger_kernel.ops.backends._ascend.rope", "liger_kernel.ops.rope"):
            log.warning("Backend impl '%s' for op '%s' could not be imported: %s: %s", path, "rope", "ImportError", "not here")
        log.warning("_discover(%r): all declared paths imported but no @register_op ran.", "rope")
    said = [r.getMessage() for r in caplog.records]
    assert not any("backends._" in m for m in said), said
    assert any("'liger_kernel.ops.rope'" in m for m in said) and any("_discover" in m for m in said), said


# ------------------------------------------------------------------------------------------ the weights read ahead


def test_read_ahead_reads_the_files_in_order_within_its_budget_and_skips_what_it_cannot_read(tmp_path, monkeypatch) -> None:
    """The loader's order, never past the budget (the rest is left to the loader), a missing file skipped without a
    word (the loader names it in its own error), and nothing read at all without a budget (free memory unknown)."""
    import builtins

    import mcvqa.io as mio

    sizes = {"a": 300_000, "b": 500_000, "c": 400_000}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes([len(name)]) * size)
    opened: list[str] = []

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(mio, "open", recording_open, raising=False)
    monkeypatch.setattr(mio, "READ_CHUNK", 64 << 10)
    monkeypatch.setattr(mio, "_READ_AHEAD_DONE", set())
    (tmp_path / "unreadable").mkdir()  # exists, cannot be read as a file
    files = [tmp_path / "a", tmp_path / "missing", tmp_path / "unreadable", tmp_path / "b", tmp_path / "c"]
    with mio.ReadAhead(files, budget=None) as ahead:
        ahead.join()
    assert opened == [] and ahead.bytes_read == 0
    with mio.ReadAhead(files, budget=700_000) as ahead:
        ahead.join()
    assert opened == ["a", "unreadable", "b"] and ahead.bytes_read == 700_000
    opened.clear()
    # The next load of the same checkpoint (a k-fold run's next fold) copies only what the first did not read whole.
    with mio.ReadAhead(files, budget=10 << 20) as ahead:
        ahead.join()
    assert opened == ["unreadable", "b", "c"] and ahead.bytes_read == sizes["b"] + sizes["c"]
    opened.clear()
    (tmp_path / "c").write_bytes(b"changed")  # a file replaced since is read again
    with mio.ReadAhead(files, budget=10 << 20) as ahead:
        ahead.join()
    assert opened == ["unreadable", "c"] and ahead.bytes_read == len(b"changed")


def test_weight_files_are_the_index_shards_in_the_loaders_order(tmp_path) -> None:
    """A sharded checkpoint's shards as its index lists them (sorted, each once; an adapter saved beside the base is not
    a base shard, a malformed entry is ignored); without an index, every safetensors file by name."""
    import json

    from mcvqa.io import weight_files

    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", "embed.weight": "model-00001-of-00002.safetensors",
                            "norm.weight": "model-00002-of-00002.safetensors", "odd": 3}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    assert weight_files(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").unlink()
    assert weight_files(tmp_path) == sorted(tmp_path.glob("*.safetensors"))


def test_free_memory_is_capped_by_the_containers_limit(tmp_path, monkeypatch) -> None:
    """Inside a container ``MemAvailable`` is the host's: the cgroup's limit less its usage caps it (v2 and v1), and no
    limit (``max``, v1's sentinel) leaves it alone."""
    import mcvqa.io as mio

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")
    (v2 / "memory.current").write_text("2147483648\n")
    assert mio._cgroup_memory_left(v2) == 6 << 30
    (v2 / "memory.max").write_text("max\n")
    assert mio._cgroup_memory_left(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(4 << 30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(1 << 30))
    assert mio._cgroup_memory_left(v1) == 3 << 30
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert mio._cgroup_memory_left(v1) is None and mio._cgroup_memory_left(tmp_path / "none") is None
    monkeypatch.setattr(mio, "_cgroup_memory_left", lambda: 1 << 30)  # a 1 GiB container on a larger machine
    assert mio.available_memory() == 1 << 30


def test_read_ahead_stops_when_its_block_ends(monkeypatch) -> None:
    """A file without end (a read that would go on for the whole budget) stops being read once the load is done."""
    import threading
    import time

    import mcvqa.io as mio

    class Endless:
        def __init__(self):
            self.reads = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def readinto(self, view):
            self.reads += 1
            return len(view)

    endless = Endless()
    monkeypatch.setattr(mio, "open", lambda *a, **k: endless, raising=False)
    monkeypatch.setattr(mio, "_READ_AHEAD_DONE", set())
    with mio.ReadAhead([__file__], budget=1 << 60) as ahead:
        while endless.reads < 3:
            time.sleep(0.001)
    assert not any(t.name == "mcvqa-read-ahead" for t in threading.enumerate())
    after = endless.reads
    time.sleep(0.05)
    assert endless.reads == after and ahead.bytes_read == after * mio.READ_CHUNK


def test_load_model_reads_the_weights_ahead_while_the_processor_and_the_weights_load(tiny_model, cfg_factory, monkeypatch) -> None:
    """The checkpoint's shards, within half the free memory, read from before the processor loads until the weights
    are in; ``model.read_ahead=false`` reads nothing ahead, and a Hub id resolves to its cached snapshot."""
    import huggingface_hub
    import transformers

    import mcvqa.io as mio
    import mcvqa.model as mm
    from mcvqa.io import ReadAhead

    seen: dict[str, object] = {}
    live: list[ReadAhead] = []

    class Recording(ReadAhead):
        def __enter__(self):
            seen["files"], seen["budget"] = list(self.files), self.budget
            live.append(self)
            return super().__enter__()

        def __exit__(self, *exc):
            live.remove(self)
            return super().__exit__(*exc)

    processor_load, weights_load = mm.load_processor, transformers.AutoModelForImageTextToText.from_pretrained

    def processor(*a, **k):
        seen["during_processor"] = bool(live)
        return processor_load(*a, **k)

    def weights(*a, **k):
        seen["during_weights"] = bool(live)
        return weights_load(*a, **k)

    monkeypatch.setattr(mm, "ReadAhead", Recording)
    monkeypatch.setattr(mm, "load_processor", processor)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", weights)
    monkeypatch.setattr(mio, "available_memory", lambda: 8 << 30)
    mm.load_model(cfg_factory().model)
    shards = sorted(tiny_model.glob("*.safetensors"))
    assert shards and seen == {"files": shards, "budget": 4 << 30, "during_processor": True, "during_weights": True}
    assert not live
    mm.load_model(cfg_factory("model.read_ahead=false").model)
    assert seen["files"] == []

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(tiny_model / name) if repo == "org/model" else None)
    assert mm._checkpoint_folder("org/model", local_only=True) == tiny_model
    assert mm._checkpoint_folder("org/model", local_only=False) is None  # it may download: the files are not known yet
    assert mm._checkpoint_folder("org/other", local_only=True) is None


@pytest.mark.parametrize("command,read_ahead", [("predict", True), ("predict", False), ("train", True)])
def test_the_command_line_starts_reading_the_weights_before_its_imports_and_the_load_takes_the_reader_over(
        tiny_model, synth_data, tmp_path, monkeypatch, capsys, command, read_ahead) -> None:
    """``mcvqa predict`` and ``mcvqa train`` (given the model folder as a relative path, which training resolves before
    it loads): the reader starts before the command imports its recipe (and through it torch and transformers), the
    load takes that same reader over instead of reading the files a second time and stops it when the weights are in;
    ``model.read_ahead=false`` starts none."""
    import builtins

    from conftest import run_cli

    import mcvqa.io as mio
    import mcvqa.model as mm

    started: list[mio.ReadAhead] = []
    events: list[str] = []
    seen: dict[str, object] = {}
    start, early, load_reader, real_import = mio.ReadAhead.start, mio.read_ahead_early, mm.read_ahead, builtins.__import__

    def recording_start(self):
        if self.files and not self._started:
            started.append(self)
        return start(self)

    def recording_early(name):
        events.append("reader")
        return early(name)

    def recording_import(name, *args, **kwargs):
        if name in ("mcvqa.predict", "mcvqa.train"):
            events.append(name)
        return real_import(name, *args, **kwargs)

    def recording_load_reader(*a, **k):
        seen["load"] = load_reader(*a, **k)
        return seen["load"]

    monkeypatch.setattr(mio, "_EARLY", None)
    monkeypatch.setattr(mio, "_READ_AHEAD_DONE", set())
    monkeypatch.setattr(mio.ReadAhead, "start", recording_start)
    monkeypatch.setattr(mio, "read_ahead_early", recording_early)
    monkeypatch.setattr(mm, "read_ahead", recording_load_reader)
    monkeypatch.setattr(builtins, "__import__", recording_import)
    monkeypatch.chdir(tiny_model.parent)
    common = ["--model", tiny_model.name, "--out", str(tmp_path / "o"), "-q", "--device", "cpu", "--dtype", "fp32", "--image-size", "64",
              "--set", f"model.read_ahead={str(read_ahead).lower()}"]
    if command == "predict":
        argv = ["predict", "--data", str(synth_data / "test.csv"), *common]
    else:
        argv = ["train", "--data", str(synth_data / "train.csv"), *common, "--set", "train.method=lora", "--set", "lora.r=4",
                "--set", "train.report_to=[]", "--set", "train.epochs=1", "--set", "train.stop_after_steps=1",
                "--set", "train.gradient_checkpointing=false", "--set", "prompt.name=plain_ko"]
    code, _, err = run_cli(argv, capsys)
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert code == 0, err
    assert mio._EARLY is None
    if read_ahead:
        assert events[:2] == ["reader", f"mcvqa.{command}"], events
        assert len(started) == 1 and seen["load"] is started[0], started
        assert [f.resolve() for f in started[0].files] == sorted(tiny_model.glob("*.safetensors")) and started[0]._stop.is_set()
    else:
        assert started == []


def test_a_command_that_ends_before_its_load_stops_its_reader(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    """A reader the command line started, when the command fails before any model loads (here: no such CSV), is
    stopped when the command ends, so a process that goes on (a notebook, the tests) is not left reading."""
    from conftest import run_cli

    import mcvqa.io as mio

    monkeypatch.setattr(mio, "_EARLY", None)
    readers: list[mio.ReadAhead] = []
    early = mio.read_ahead_early

    def recording_early(name):
        early(name)
        readers.append(mio._EARLY)

    monkeypatch.setattr(mio, "read_ahead_early", recording_early)
    code, _, err = run_cli(["predict", "--model", str(tiny_model), "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope.csv" in err
    assert readers and readers[0] is not None and readers[0]._stop.is_set() and mio._EARLY is None


def test_triton_key_is_computed_in_a_daemon_thread() -> None:
    """Triton's once-a-process cache key (a hash of its compiler library) is computed by the thread, so Liger's first
    kernel finds it cached instead of hashing while the GPU waits."""
    cache = pytest.importorskip("triton.runtime.cache")
    from mcvqa.kernels import warm_triton_key

    cache.triton_key.cache_clear()
    thread = warm_triton_key()
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert cache.triton_key.cache_info().currsize == 1
    hits = cache.triton_key.cache_info().hits
    cache.triton_key()
    assert cache.triton_key.cache_info().hits == hits + 1  # what the first kernel's lookup now finds


@pytest.mark.parametrize("device, kernels, warmed", [("cuda", "auto", True), ("cuda", "off", False), ("cpu", "auto", False)])
def test_the_load_warms_triton_key_after_the_processor_where_liger_will_run(tiny_model, cfg_factory, monkeypatch, device, kernels, warmed) -> None:
    """On a GPU with Liger's kernels to come, the load starts the key's thread once the processor (whose imports
    bring Triton in) is loaded and before the weights; nowhere else. The CUDA case stops at the weights, which this
    machine cannot place on a GPU."""
    import importlib.util

    import transformers

    import mcvqa.kernels as mk
    import mcvqa.model as mm

    order: list[str] = []
    processor_load = mm.load_processor
    monkeypatch.setattr(mm, "load_processor", lambda *a, **k: (order.append("processor"), processor_load(*a, **k))[1])
    monkeypatch.setattr(mk, "warm_triton_key", lambda: order.append("triton key"))
    monkeypatch.setattr(mm, "resolve_device", lambda cfg: torch.device(device))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else find_spec(name, *a))

    class WeightsReached(Exception):
        pass

    def weights(*a, **k):
        order.append("weights")
        raise WeightsReached

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", weights)
    cfg = cfg_factory(f"model.kernels={kernels}")
    with pytest.raises(WeightsReached):
        mm.load_model(cfg.model)
    assert order == (["processor", "triton key", "weights"] if warmed else ["processor", "weights"])
