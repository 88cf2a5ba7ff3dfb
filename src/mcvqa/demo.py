"""``mcvqa demo`` / ``make demo``: the whole pipeline on CPU in a few minutes, printing each step's command."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mcvqa.config import load_config, resolve_recipe

DEMO_KINDS = ["colour", "shape", "position"]
"""Question kinds of the demo. Each uses four fixed options (``values=4``), so the answer is decided by the
picture and the question alone; matching free option text to a picture is what a from-scratch model
learns last (see the README's demo notes). ``synth`` defaults to all kinds and full vocabularies."""
DEMO_VALUES = 4


def run_demo(
    out: Path,
    *,
    train_rows: int = 3000,
    test_rows: int = 500,
    config: Path | str = "demo",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    from mcvqa.evaluate import evaluate_files, format_metrics
    from mcvqa.predict import predict
    from mcvqa.synth import SynthConfig, synthesize
    from mcvqa.tiny import build_tiny
    from mcvqa.train import train

    config = resolve_recipe(config)  # configs/demo.yaml from the repository, else the recipe shipped in the package
    data, model, run = out / "data" / "synth", out / "models" / "tiny", out / "runs" / "demo"
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def step(name: str, cmd: str) -> float:
        log(f"\n$ {cmd}")
        return time.perf_counter()

    t = step("synth", f"mcvqa synth --out {data} --train {train_rows} --test {test_rows} --kinds {','.join(DEMO_KINDS)} --values {DEMO_VALUES}")
    synthesize(data, SynthConfig(train=train_rows, test=test_rows, kinds=DEMO_KINDS, values=DEMO_VALUES))
    times["synth"] = time.perf_counter() - t

    t = step("tiny", f"mcvqa tiny --out {model}")
    build_tiny(model)
    times["tiny"] = time.perf_counter() - t

    cfg = load_config(config, {"model": {"name_or_path": str(model)}}, inherit=[model])
    t = step("train", f"mcvqa train --config {config} --model {model} --data {data / 'train.csv'} --out {run}")
    if (run / "checkpoints").exists():
        import shutil

        shutil.rmtree(run)  # the demo always starts fresh
    result = train(cfg, data / "train.csv", run, progress=progress, log_fn=log)
    times["train"] = time.perf_counter() - t

    best = run / "best"
    pcfg = load_config(config, {"model": {"name_or_path": str(best)}}, inherit=[best])
    t = step("predict", f"mcvqa predict --model {best} --data {data / 'test.csv'} --out {run / 'pred'}")
    pred_out = run / "pred"
    if (pred_out / "journal.jsonl").exists():
        (pred_out / "journal.jsonl").unlink()
    predict(pcfg, data / "test.csv", pred_out, progress=progress, log=log)
    times["predict"] = time.perf_counter() - t

    t = step("evaluate", f"mcvqa evaluate --pred {pred_out / 'probs.csv'} --data {data / 'test_labels.csv'}")
    m = evaluate_files(pred_out / "probs.csv", data / "test_labels.csv")
    log(format_metrics(m, title="held-out synthetic test set"))
    times["evaluate"] = time.perf_counter() - t
    total = time.perf_counter() - t_all
    log(
        f"\ndemo: held-out accuracy {m['accuracy']:.4f} on {m['n']} questions; "
        f"best validation accuracy {result.best_metrics.get('accuracy', float('nan')):.4f}; "
        f"total {total:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + ")"
    )
    log(f"loss curve: {run / 'loss.png'}")
    return {"accuracy": m["accuracy"], "seconds": total, **times}
