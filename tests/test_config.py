"""Config: every shipped recipe loads and validates; overrides are typed; mistakes name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcvqa.config import SECTIONS, describe, field_docs, load_config, parse_overrides
from mcvqa.errors import ConfigError

ROOT = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(p for p in ROOT.glob("*.yaml") if p.name != "search_space.yaml" and not p.name.startswith("accelerate_"))
ACCELERATE = sorted(ROOT.glob("accelerate_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads_and_starts_with_its_command(path: Path) -> None:
    cfg = load_config(path, env=False)
    assert cfg.to_dict()
    head = path.read_text(encoding="utf-8").splitlines()[:12]
    assert any("mcvqa " in line or "accelerate launch" in line for line in head if line.startswith("#")), f"{path.name} must open with its command"


def test_seed_recipe_is_the_reference() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "seed.yaml", env=False)
    assert (cfg.model.name_or_path, cfg.model.quant) == ("Qwen/Qwen3-VL-8B-Instruct", "nf4")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.use_rslora) == (32, 32, 0.05, True)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not cfg.lora.vision
    t = cfg.train
    assert (t.lr, t.batch_size, t.grad_accum, t.weight_decay, t.epochs, t.scheduler, t.warmup_ratio) == (1e-4, 8, 2, 0.01, 5, "cosine", 0.05)
    assert (cfg.image.mode, cfg.image.size, cfg.prompt.name, cfg.predict.scoring) == ("letterbox", 512, "fewshot_ko", "logits")


def test_overrides_are_typed_and_win() -> None:
    cfg = load_config(None, ["lora.r=16", "train.lr=2e-4", "train.option_shuffle=true", "lora.target_modules=q_proj,v_proj", "image.fill=[1,2,3]"], env=False)
    assert cfg.lora.r == 16 and cfg.train.lr == 2e-4 and cfg.train.option_shuffle is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.image.fill == (1, 2, 3)


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora.rank=4", "unknown field lora.rank"),
        ("optim.lr=1", "unknown section 'optim'"),
        ("lora.r=0", "lora.r must be > 0"),
        ("train.batch_size=two", "train.batch_size must be an integer"),
        ("model.quant=nf8", "model.quant must be one of none, nf4, int8"),
        ("train.kfold=1", "train.kfold must be 0 (off) or at least 2"),
        ("lora.r", "expected section.field=value"),
    ],
)
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override], env=False)


def test_environment_supplies_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCVQA_MODEL", "/models/qwen")
    monkeypatch.setenv("MCVQA_DATA", "/data/comp")
    cfg = load_config(None)
    assert cfg.model.name_or_path == "/models/qwen" and cfg.data.root == "/data/comp"
    assert load_config(None, ["model.name_or_path=x"]).model.name_or_path == "x"


def test_every_field_is_documented() -> None:
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if f not in docs]
        assert not missing, f"{name}: undocumented {missing}"
    text = describe(load_config(None, env=False))
    assert "lora:" in text and "# LoRA rank." in text


def test_parse_overrides_yaml_values() -> None:
    assert parse_overrides(["train.report_to=[]", "data.root=null"]) == {"train": {"report_to": []}, "data": {"root": None}}


def test_search_space_validates() -> None:
    from mcvqa.tune import load_space

    path = Path(__file__).parent.parent / "configs" / "search_space.yaml"
    space = load_space(path, None)
    assert space["train.lr"]["log"] is True and "lora.r" in space
    assert path.read_text(encoding="utf-8").startswith("# Search space for `mcvqa tune`")


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_configs_parse_and_say_how_to_launch(path: Path) -> None:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and data["num_processes"] >= 2
    assert "accelerate launch --config_file" in path.read_text(encoding="utf-8").splitlines()[1]


def test_tta_best_expands_to_the_evaluated_methods() -> None:
    from mcvqa.config import BEST_TTA

    cfg = load_config(None, ["tta.methods=best"], env=False)
    assert cfg.tta.methods == BEST_TTA == ["orders", "views"]
    assert load_config(None, ["tta.methods=best,blend"], env=False).tta.methods == ["orders", "views", "blend"]
