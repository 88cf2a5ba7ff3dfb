"""Evaluate every test-time method on honest synthetic conditions with tiny models trained here (CPU).

    python bench/tta_eval.py --out runs/tta_eval            # ~15 min on 2 cores; writes tta_eval.md and .json

Conditions (issue 5): the demo model on its own distribution; the same model on shifted images (blur,
colour cast, smaller shapes); a letter-biased model (trained with 60% of answers moved to 'a') on balanced
data. For every method: accuracy, CircularEval accuracy (right under all 4 cyclic option orders: the method
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

import mcvqa.adapt as A  # noqa: E402
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
    "pride (5%)": TTAConfig(methods=["pride"]),
    "views (4 + original)": TTAConfig(methods=["views"]),
    "orders + views": TTAConfig(methods=["orders", "views"]),
    "tent (norm)": TTAConfig(methods=["tent"], params="norm", lr=1e-3),
    "sar (norm)": TTAConfig(methods=["sar"], params="norm", lr=1e-3, optimizer="sgd"),
    "sar + consistency": TTAConfig(methods=["sar"], params="norm", lr=1e-3, optimizer="sgd", consistency=1.0),
    "tpt": TTAConfig(methods=["tpt"]),
    "zero": TTAConfig(methods=["zero"]),
}


def trained_model(root: Path, name: str, skew: float, config: Path) -> Path:
    best = root / name / "run" / "best"
    if (best / "model.safetensors").exists():
        return best
    data = root / name / "data"
    synthesize(data, SynthConfig(train=3000, test=0, kinds=DEMO_KINDS, values=DEMO_VALUES, answer_skew=skew, seed=7))
    tiny = build_tiny(root / name / "tiny")
    cfg = load_config(config, {"model": {"name_or_path": str(tiny)}}, inherit=[tiny])
    train(cfg, data / "train.csv", root / name / "run", progress=False, log_fn=lambda s: print(f"  [{name}] {s}", flush=True))
    return best


def run_method(scorer, items, tta: TTAConfig) -> tuple[np.ndarray, A.Cost, float]:
    t = time.perf_counter()
    res = A.run_tta(scorer, items, tta, batch_size=16, progress=False)
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
    models = {"demo": trained_model(root, "demo", 0.0, args.config), "biased": trained_model(root, "biased", 0.6, args.config)}
    conditions = {
        "same distribution": ("demo", "none"),
        "shift: blur": ("demo", "blur"),
        "shift: colour cast": ("demo", "colour_cast"),
        "shift: small shapes": ("demo", "small"),
        "letter-biased model": ("biased", "none"),
    }
    rows = []
    for cond, (model_name, shift) in conditions.items():
        data = root / "test" / shift
        if not (data / "test_labels.csv").exists():
            synthesize(data, SynthConfig(train=0, test=args.n, kinds=DEMO_KINDS, values=DEMO_VALUES, shift=shift, seed=99))
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
