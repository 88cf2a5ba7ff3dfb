"""Evaluate every test-time method on honest synthetic conditions with tiny models trained here (CPU).

    python bench/tta_eval.py --out runs/tta_eval            # ~45 min on 2 cores (3 tiny models trained, then 6 conditions x 10 methods x 5 rotations); writes tta_eval.md and .json

Models: "fixed" is the demo model (trained from scratch with each kind's four options in one fixed order:
it maps the picture to a letter and never reads the options); "reader" continues it with the options
shuffled per example, so it has to read them; "biased" continues the reader on random-order data where 60%
of the answers sit at letter a. Conditions (issue 5): same distribution; shifted images (blur, colour cast,
smaller shapes); the letter-biased model on balanced data. For every method: accuracy, CircularEval accuracy (right under all 4 cyclic option orders: the method
is run on each rotated copy of the test set), expected calibration error, cost in forward/backward passes
per question, and CPU time per question.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mcvqa.tta as A  # noqa: E402
from mcvqa.config import TTAConfig, load_config  # noqa: E402
from mcvqa.data import read_csv  # noqa: E402
from mcvqa.demo import DEMO_KINDS, DEMO_VALUES  # noqa: E402
from mcvqa.evaluate import expected_calibration_error  # noqa: E402
from mcvqa.features import cyclic_orders  # noqa: E402
from mcvqa.predict import build_scorer  # noqa: E402
from mcvqa.synth import SynthConfig, synthesize  # noqa: E402
from mcvqa.tiny import build_tiny  # noqa: E402
from mcvqa.train import train  # noqa: E402

METHODS = {
    "plain": TTAConfig(methods=[]),
    "orders (4 cyclic)": TTAConfig(methods=["orders"]),
    "pride (5%; >= 32 q)": TTAConfig(methods=["pride"]),
    "views (4 + original)": TTAConfig(methods=["views"]),
    "orders + views": TTAConfig(methods=["orders", "views"]),
    "pride + views": TTAConfig(methods=["pride", "views"]),
    "tent (norm)": TTAConfig(methods=["tent"], params="norm", lr=1e-3),
    "sar (norm)": TTAConfig(methods=["sar"], params="norm", lr=1e-3, optimizer="sgd"),
    "sar + consistency": TTAConfig(methods=["sar"], params="norm", lr=1e-3, optimizer="sgd", consistency=1.0),
    "tpt": TTAConfig(methods=["tpt"]),
    "zero": TTAConfig(methods=["zero"]),
}


def trained_model(root: Path, name: str, config: Path, start: Path | None = None, order: str = "canonical", skew: float = 0.0, sets: list[str] | None = None) -> Path:
    """Train (or reuse) one tiny model; ``start`` continues from another model's weights."""
    best = root / name / "run" / "best"
    if (best / "model.safetensors").exists():
        return best
    data = root / name / "data"
    synthesize(data, SynthConfig(train=3000, test=0, kinds=DEMO_KINDS, values=DEMO_VALUES, option_order=order, answer_skew=skew, seed=7))
    init = start if start is not None else build_tiny(root / name / "tiny")
    overrides = [f"model.name_or_path={init}", *(sets or [])]
    cfg = load_config(config, overrides, inherit=[init])
    train(cfg, data / "train.csv", root / name / "run", progress=False, log_fn=lambda s: print(f"  [{name}] {s}", flush=True))
    return best


def run_method(scorer, items, tta: TTAConfig) -> tuple[np.ndarray, A.Cost, float]:
    t = time.perf_counter()
    res = A.run(scorer, items, tta, batch_size=16, progress=False)
    return res.probs, res.cost, (time.perf_counter() - t) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/tta_eval"))
    ap.add_argument("--n", type=int, default=160, help="test questions per condition")
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    fixed = trained_model(root, "fixed", args.config)
    cont = ["train.lr=3e-4", "train.warmup_ratio=0.05"]
    reader = trained_model(root, "reader", args.config, start=fixed, sets=["train.option_shuffle=true", *cont])
    models = {
        "fixed": fixed,
        "reader": reader,
        "biased": trained_model(root, "biased", args.config, start=reader, order="random", skew=0.6, sets=cont),
    }
    conditions = {
        "fixed-option model, canonical order": ("fixed", "none", "canonical"),
        "reader, same distribution": ("reader", "none", "random"),
        "reader, shift: blur": ("reader", "blur", "random"),
        "reader, shift: colour cast": ("reader", "colour_cast", "random"),
        "reader, shift: small shapes": ("reader", "small", "random"),
        "letter-biased reader, balanced test": ("biased", "none", "random"),
    }
    rows = []
    for cond, (model_name, shift, order) in conditions.items():
        data = root / "test" / f"{shift}-{order}"
        if not (data / "test_labels.csv").exists():
            synthesize(data, SynthConfig(train=0, test=args.n, kinds=DEMO_KINDS, values=DEMO_VALUES, shift=shift, option_order=order, seed=99))
        items = read_csv(data / "test_labels.csv").items[: args.n]
        labels = np.array([it.answer for it in items])
        cfg = load_config(args.config, {"model": {"name_or_path": str(models[model_name])}}, inherit=[models[model_name]])
        scorer = build_scorer(cfg)
        for name in args.methods.split(","):
            tta = METHODS[name]
            probs, cost, secs = run_method(scorer, items, tta)
            # CircularEval: the method on every cyclic rotation of the options, answers mapped back.
            right = np.ones(len(items), dtype=bool)
            for order in cyclic_orders(4):
                rotated = [it.permuted(order) for it in items]
                p_rot, _, _ = run_method(scorer, rotated, tta)
                pred_original = np.array(order)[p_rot.argmax(1)]
                right &= pred_original == labels
            row = {
                "condition": cond, "method": name, "accuracy": float((probs.argmax(1) == labels).mean()),
                "circular": float(right.mean()), "ece": expected_calibration_error(probs, labels),
                "forwards": cost.forwards, "backwards": cost.backwards, "ms_per_question": 1000 * secs,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            (root / "tta_eval.json").write_text(json.dumps(rows, indent=2))
    lines = ["| condition | method | accuracy | CircularEval | ECE | fwd/q | bwd/q | CPU ms/q |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['condition']} | {r['method']} | {r['accuracy']:.3f} | {r['circular']:.3f} | {r['ece']:.3f} | {r['forwards']:.2f} | {r['backwards']:.0f} | {r['ms_per_question']:.1f} |")
    (root / "tta_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
