"""The ``mcvqa`` command: one thin typer command per verb over importable functions.

User mistakes (bad CSV, missing file, invalid flag value) print one ``error:`` line and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mcvqa.errors import McvqaError

app = typer.Typer(
    name="mcvqa",
    help="Multiple-choice VQA with vision-language models (Qwen3-VL, Qwen3.5, Gemma 4, InternVL, LLaVA-OneVision): synthetic data, tiny local models, training, prediction, test-time methods, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _flags_take_no_value() -> None:
    """Typer's help prints a type column for every option, ``<bool>`` included for flags that take no value
    (``--resume <bool>`` reads as if it wanted an argument). Show no type for flags."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    show = getattr(option, "display_type_rich", None)
    if show is None or getattr(show, "_mcvqa", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else show(self, ctx)

    display_type_rich._mcvqa = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_flags_take_no_value()

# ---------------------------------------------------------------------------------------------- shared options

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe: a file, or a shipped one by name (seed, seed_plus, demo, three_families; configs/ in the repository). Flags and --set override it.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: --set lora.r=16 --set train.lr=2e-4")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model folder or Hub id (env MCVQA_MODEL).")]
DataRootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Images must lie inside this folder (default: the CSV's folder; env MCVQA_DATA).")]
QuantOpt = Annotated[Optional[str], typer.Option("--quant", help="none | nf4 | int8 | fp8 (4/8-bit needs a GPU and the gpu extra; fp8: predict only, Ada/Hopper GPUs).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto | bf16 | fp16 | fp32")]
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", help="fewshot_ko | plain_ko | plain_en | path to a prompt YAML")]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Letterbox side in pixels (default 512).")]
ImageModeOpt = Annotated[Optional[str], typer.Option("--image-mode", help="letterbox | native")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def one_line(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line  # type: ignore[assignment]
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _config(config: Path | None, sets: list[str] | None, inherit: list[Any] | None = None, **flags: Any) -> Any:
    """Model/adapter mcvqa.yaml < recipe < --set < explicit flags (``section__field=value``; None = not given)."""
    from mcvqa.config import load_config, parse_overrides

    overrides = parse_overrides(sets)
    for key, value in flags.items():
        if value is None:
            continue
        section, name = key.split("__", 1)
        overrides.setdefault(section, {})[name] = value
    return load_config(config, overrides, inherit=inherit)


def _read_ahead(cfg: Any) -> None:
    """The model's weight files read from now on, while the command imports torch and transformers (seconds of Python
    with the disk idle); the load takes this reader over (``model.read_ahead``, :func:`mcvqa.io.read_ahead_early`).
    For the commands that load one model soon after their configuration (predict, train, quantize, serve)."""
    if cfg.model.read_ahead:
        from mcvqa.io import read_ahead_early

        read_ahead_early(cfg.model.name_or_path)


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


# ---------------------------------------------------------------------------------------------- commands


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write train.csv, test.csv, test_labels.csv, sample_submission.csv and images.")],
    train: Annotated[int, typer.Option(help="Labelled training rows.")] = 2000,
    test: Annotated[int, typer.Option(help="Test rows (labels go to test_labels.csv).")] = 500,
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
    kinds: Annotated[Optional[str], typer.Option(help="Comma list of question kinds: colour,shape,position,count,digit,letter,absent.")] = None,
    option_order: Annotated[str, typer.Option(help="canonical (vocabulary order) | random (shuffled, harder).")] = "canonical",
    shift: Annotated[str, typer.Option(help="Distribution shift: none | colour_cast | blur | small | noise.")] = "none",
    answer_skew: Annotated[float, typer.Option(help="Fraction of training answers forced to 'a' (letter-biased data).")] = 0.0,
    values: Annotated[int, typer.Option(help="Use only the first N values of each kind (4: every kind has fixed options).")] = 0,
    image_size: Annotated[str, typer.Option("--image-size", help="Landscape canvas WxH (half the images are drawn portrait); 720x540 is the competition's photo size.")] = "240x180",
    quiet: QuietOpt = False,
) -> None:
    """Draw a synthetic dataset in the competition's CSV format (Korean questions, answers balanced over a-d)."""
    from mcvqa.runtime import progress_bar
    from mcvqa.synth import KINDS, SynthConfig, synthesize

    try:
        w, h = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        raise McvqaError(f"--image-size {image_size!r}: expected WIDTHxHEIGHT, e.g. 720x540") from None
    try:
        cfg = SynthConfig(
            train=train, test=test, seed=seed, kinds=kinds.split(",") if kinds else list(KINDS),
            option_order=option_order, shift=shift, answer_skew=answer_skew, values=values, size=(w, h),
        )
    except ValueError as e:
        raise McvqaError(str(e)) from None
    t0 = time.perf_counter()
    with progress_bar(total=train + test, desc="drawing", unit="img", disable=quiet) as bar:
        paths = synthesize(out, cfg, progress=bar.update)
    for name, p in paths.items():
        typer.echo(f"{name:18s} {p}")
    _echo(f"{train + test} questions in {time.perf_counter() - t0:.1f}s")


@app.command()
def tiny(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the Hugging Face checkpoint (config, safetensors, tokenizer, processor).")],
    hidden: Annotated[Optional[int], typer.Option(help="Text hidden size (default 128; 64 with --like).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Text decoder layers (default 3; 2 with --like).")] = None,
    vision_depth: Annotated[Optional[int], typer.Option(help="Vision transformer blocks (default 2).")] = None,
    vocab: Annotated[int, typer.Option(help="BPE vocabulary size trained locally (not with --like: the real tokenizer is used).")] = 1024,
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    like: Annotated[Optional[Path], typer.Option("--like", help="A real checkpoint folder (config.json, tokenizer, chat template and processor files; no weights needed): its architecture at toy sizes, with its real tokenizer and processor.")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="qwen3_vl (default) | qwen2_5_vl | qwen3_5 | gemma4 | internvl | llava_onevision; with --like, checked against its config.")] = None,
) -> None:
    """Build a tiny model locally (real architecture classes, random weights) and save it in Hugging Face format."""
    from dataclasses import replace

    from mcvqa.tiny import LikeSpec, TinySpec, build_tiny, build_tiny_like

    sizes = {k: v for k, v in {"hidden_size": hidden, "num_hidden_layers": layers, "vision_depth": vision_depth}.items() if v is not None}
    if like is not None:
        if arch is not None:
            import json as _json

            model_type = _json.loads((like / "config.json").read_text(encoding="utf-8")).get("model_type") if (like / "config.json").is_file() else None
            if model_type != arch:
                raise McvqaError(f"--like {like} is a {model_type} checkpoint, not --arch {arch}")
        path = build_tiny_like(like, out, replace(LikeSpec(seed=seed), **sizes))
    else:
        path = build_tiny(out, replace(TinySpec(vocab_size=vocab, seed=seed), **sizes), arch or "qwen3_vl")
    typer.echo(str(path))


@app.command()
def predict(
    data: Annotated[Path, typer.Option("--data", "-d", help="Test CSV (id,path,question,a,b,c,d).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: submission.csv, probs.csv, config.yaml.")],
    model: ModelOpt = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter folder from `mcvqa train` (e.g. runs/t1/best).")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Questions per forward pass.")] = None,
    scoring: Annotated[Optional[str], typer.Option(help="logits (default) | generate (the reference's generate-and-parse).")] = None,
    quant: QuantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    prompt: PromptOpt = None,
    image_size: ImageSizeOpt = None,
    image_mode: ImageModeOpt = None,
    data_root: DataRootOpt = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Image-decoding worker processes (-1: auto, up to 8 on a GPU, 0 on CPU).")] = None,
    on_bad_image: Annotated[Optional[str], typer.Option(help="fail (default) | skip: answer an unreadable image's question with a blank image.")] = None,
    no_prefix_cache: Annotated[bool, typer.Option("--no-prefix-cache", help="Run the system prompt for every question (for comparison).")] = False,
    tta: Annotated[Optional[str], typer.Option(help="Test-time methods, comma-separated: orders | pride, views, blend; or one of tent, sar, tpt, zero; best = orders,views (what the README's evaluation supports). Tune them with --set tta.*")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out from its journal (says so when there is none, or when it is finished).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Score a test CSV: letter probabilities from one forward pass per batch, then submission.csv + probs.csv."""
    from mcvqa.io import check_out_dir

    check_out_dir(out)

    cfg = _config(
        config, sets, [model, adapter], model__name_or_path=model, model__quant=quant, model__device=device, model__dtype=dtype,
        predict__batch_size=batch_size, predict__scoring=scoring, predict__num_workers=num_workers,
        predict__on_bad_image=on_bad_image, predict__prefix_cache=False if no_prefix_cache else None,
        tta__methods=tta,
        prompt__name=prompt, image__size=image_size, image__mode=image_mode,
        data__root=str(data_root) if data_root else None,
    )
    _read_ahead(cfg)
    from mcvqa.predict import predict as run_predict

    res = run_predict(cfg, data, out, adapter=adapter, resume=resume, progress=not quiet, log=_echo)
    typer.echo(f"submission {res.submission}")
    typer.echo(f"probs      {res.probs}")
    _echo(f"{res.n} questions in {res.seconds:.1f}s ({res.questions_per_second:.1f} q/s)")


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", "-p", help="probs.csv written by predict.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="CSV with id and answer columns (e.g. test_labels.csv).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the metrics as JSON here.")] = None,
) -> None:
    """Accuracy, accuracy per answer letter, predicted-letter distribution, confusion matrix, NLL and ECE."""
    from mcvqa.evaluate import evaluate_files, format_metrics
    from mcvqa.io import atomic_write_json, check_out_file

    if out:
        check_out_file(out)
    m = evaluate_files(pred, data)
    typer.echo(format_metrics(m, title=str(pred)))
    if out:
        atomic_write_json(out, m)


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled CSV (id,path,question,a,b,c,d,answer).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: best/ and last/ adapters, checkpoints/, metrics.json, loss.png, val.csv (the held-out rows), logs/.")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    model: ModelOpt = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="Validation CSV (default: a stratified split of --data).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training data.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Questions per device per micro-batch.")] = None,
    kfold: Annotated[Optional[int], typer.Option(help="Train K models on K folds and report mean +- std.")] = None,
    quant: QuantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    prompt: PromptOpt = None,
    image_size: ImageSizeOpt = None,
    image_mode: ImageModeOpt = None,
    data_root: DataRootOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out (says so when there is none, or when training is finished).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train LoRA/QLoRA adapters (or all weights) on the answer letter; validate each epoch; keep the best."""
    from mcvqa.io import check_out_dir

    check_out_dir(out)

    if val_data is not None and (kfold or 0) > 0:
        raise McvqaError("--val-data and --kfold exclude each other: k-fold validates on its own folds; drop one of them")
    cfg = _config(
        config, sets, [model], model__name_or_path=model, model__quant=quant, model__device=device, model__dtype=dtype,
        prompt__name=prompt, image__size=image_size, image__mode=image_mode,
        train__epochs=epochs, train__lr=lr, train__batch_size=batch_size, train__kfold=kfold,
        data__root=str(data_root) if data_root else None,
    )
    if val_data is not None and cfg.train.kfold:
        raise McvqaError(f"--val-data and train.kfold={cfg.train.kfold} exclude each other: k-fold validates on its own folds; drop one of them")
    _read_ahead(cfg)
    from mcvqa.train import train as run_train

    res = run_train(cfg, data, out, val_data=val_data, resume=resume, progress=not quiet, log_fn=_echo)
    if res.best_metrics:
        typer.echo(f"best       {res.best} " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.best_metrics.items()))
    _echo(f"{res.steps} steps in {res.seconds:.1f}s ({res.samples_per_second:.1f} samples/s)")


@app.command()
def quantize(
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the quantised checkpoint.")],
    model: ModelOpt = None,
    quant: Annotated[str, typer.Option("--quant", help="nf4 (4-bit, double quantisation) | int8.")] = "nf4",
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Save a model already quantised (as predict/train quantise it at load), so later runs load it as it is."""
    cfg = _config(config, sets, [model], model__name_or_path=model, model__quant=quant, model__device=device, model__dtype=dtype)
    _read_ahead(cfg)
    from mcvqa.model import save_quantized

    t0 = time.perf_counter()
    path = save_quantized(cfg.model, out)
    typer.echo(str(path))
    _echo(f"{cfg.model.name_or_path} -> {path} ({cfg.model.quant}) in {time.perf_counter() - t0:.1f}s; use it as --model {path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where data/, models/ and runs/ of the demo go.")] = Path("."),
    train_rows: Annotated[int, typer.Option("--train", help="Synthetic training rows.")] = 3000,
    test_rows: Annotated[int, typer.Option("--test", help="Synthetic test rows.")] = 500,
    config: ConfigOpt = Path("demo"),
    quiet: QuietOpt = False,
) -> None:
    """The embedded default, end to end on CPU: synthetic data -> tiny Qwen3-VL -> train -> predict -> evaluate."""
    from mcvqa.demo import run_demo

    run_demo(out, train_rows=train_rows, test_rows=test_rows, config=config, progress=not quiet, log=_echo)


@app.command()
def tune(
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled CSV to tune on.")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for trials, best_recipe.yaml, tune_summary.json and optimization_history.png.")] = Path("runs/tune"),
    study: Annotated[Path, typer.Option(help="SQLite file of the study (resumable; several workers may share it).")] = Path("runs/study.db"),
    name: Annotated[str, typer.Option(help="Study name inside the file.")] = "mcvqa",
    trials: Annotated[int, typer.Option(help="Trials to run in this process.")] = 40,
    space: Annotated[Optional[Path], typer.Option(help="Search-space YAML (default: search_space.yaml beside --config).")] = None,
    subsample: Annotated[int, typer.Option(help="Tune on a stratified subsample of this many rows (0: all).")] = 0,
    folds: Annotated[int, typer.Option(help="K-fold on the subsample; the objective is the mean accuracy.")] = 1,
    max_epochs: Annotated[int, typer.Option(help="Upper bound on epochs per trial (the pruner's resource).")] = 3,
    timeout: Annotated[Optional[float], typer.Option(help="Wall-clock limit in seconds.")] = None,
    pruner: Annotated[str, typer.Option(help="hyperband | sha | median | none")] = "hyperband",
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 42,
    heartbeat: Annotated[int, typer.Option(help="Seconds between trial heartbeats (a killed trial is retried after 2x).")] = 60,
    gpus: Annotated[int, typer.Option("--gpus", "--workers", help="Start this many worker processes on the one study, one per GPU (on CPU: processes); --trials is split between them, the summary written once.")] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Bayesian hyperparameter search (Optuna TPE) with Hyperband pruning on per-epoch validation accuracy."""
    from mcvqa.tune import TuneOptions, run_workers
    from mcvqa.tune import tune as run_tune

    if pruner not in ("hyperband", "sha", "median", "none"):
        raise McvqaError(f"--pruner must be hyperband, sha, median or none, got {pruner!r}")
    if folds < 1:
        raise McvqaError("--folds must be at least 1")
    if gpus < 0:
        raise McvqaError(f"--gpus must be 0 (this process alone) or more, got {gpus}")
    cfg = _config(config, sets, [model], model__name_or_path=model, model__device=device)
    opts = TuneOptions(trials=trials, study=study, name=name, space=space, subsample=subsample, folds=folds, max_epochs=max_epochs,
                       timeout=timeout, pruner=pruner, seed=seed, heartbeat=heartbeat)
    if gpus <= 1:
        run_tune(cfg, data, out, opts, recipe=config, progress=not quiet, log=_echo)
    else:
        run_workers(cfg, data, out, opts, gpus, recipe=config, log=_echo)


@app.command()
def ensemble(
    probs: Annotated[list[Path], typer.Option("--probs", "-p", help="probs.csv of one member; repeat for each (scored anywhere, same ids).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for submission.csv and probs.csv (and weights.json, disagreements.csv).")],
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated weights, one per member, or a weights.json from --fit-weights (default equal).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="CSV of the scored questions: fixes the row order; with --fit-weights it must hold the answers (val.csv).")] = None,
    fit_weights: Annotated[bool, typer.Option("--fit-weights", help="Fit the weights on --data's answers (cross-validated), report members, ensemble and disagreements, write weights.json.")] = False,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for --fit-weights.")] = 5,
) -> None:
    """Average members' log-probabilities (weighted) into one submission; optionally fit the weights first."""
    from mcvqa.ensemble import format_report
    from mcvqa.ensemble import run as run_ensemble

    res = run_ensemble(probs, out, weights, data, fit_weights, folds, names=_member_names(probs))
    if res.report is not None:
        typer.echo(format_report(res.report))
    typer.echo(f"submission {res.submission}")
    typer.echo(f"probs      {res.probs}")
    if res.disagreements is not None:
        typer.echo(f"disagree   {res.disagreements} ({res.n_disagreements} questions)")


def _member_names(paths: list[Path]) -> list[str]:
    """A short name per member: the nearest folder that tells them apart (``runs/qwen3vl/val/probs.csv`` and
    ``runs/gemma4/val/probs.csv`` -> qwen3vl, gemma4), numbered if nothing does."""
    parents = [p.resolve().parent.parts for p in paths]
    for k in range(1, max(len(x) for x in parents) + 1):
        tails = [x[-k:] for x in parents]
        if len(set(tails)) == len(tails):
            return [t[0] for t in tails]
    return [f"{p.parent.name or p.stem}_{i + 1}" for i, p in enumerate(paths)]


@app.command()
def report(
    pred: Annotated[Path, typer.Option("--pred", "-p", help="probs.csv written by predict.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled CSV with the images (e.g. val.csv or test_labels.csv).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write (self-contained).")] = Path("report.html"),
    compare: Annotated[Optional[Path], typer.Option(help="Another run's probs.csv to compare question by question.")] = None,
    mistakes: Annotated[int, typer.Option(help="How many of the most confident mistakes to show.")] = 24,
    title: Annotated[Optional[str], typer.Option(help="Page title.")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """A single self-contained HTML report: metrics, confusion, letter bias, calibration, question types, mistakes."""
    from mcvqa.io import check_out_file
    from mcvqa.report import build_report

    check_out_file(out)

    path = build_report(pred, data, out, compare=compare, top_mistakes=mistakes, title=title, data_root=data_root)
    typer.echo(str(path))


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter folder.")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    examples: Annotated[Optional[Path], typer.Option(help="A dataset CSV whose first rows are offered as examples.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    device: DeviceOpt = None,
) -> None:
    """A Gradio page: drop an image, type a question and four options, see the answer and its probabilities."""
    cfg = _config(config, sets, [model, adapter], model__name_or_path=model, model__device=device)
    _read_ahead(cfg)
    from mcvqa.serve import launch

    launch(cfg, adapter=adapter, examples=examples, host=host, port=port)


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Print the resolved config, every field with its documentation."""
    from mcvqa.config import describe

    typer.echo(describe(_config(config, sets)))


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's time limit, ``kill``, a notebook's stop button), raised in the main
    thread by :func:`main`'s handlers so that every ``finally`` runs and the work already journaled stays. Not a
    KeyboardInterrupt, which typer swallows into a silent exit 130; and Python's default for SIGTERM ends the
    process at once, without a word."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signum)
        self.name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.code = 128 + signum


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def interrupted_message(argv: list[str], by: str) -> str:
    """One line for Ctrl-C / SIGTERM: what was kept and how to continue, for the commands that can resume."""
    command = next((a for a in argv if not a.startswith("-")), "")
    out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "-o")), None)
    if command == "predict" and out:
        kept = f"every batch scored so far is kept in {out}'s journal; the same command with --resume scores only the rest"
    elif command == "train" and out:
        steps = sorted(Path(out).glob("checkpoints/step_*[0-9]")) + sorted(Path(out).glob("fold_*/checkpoints/step_*[0-9]"))
        kept = (f"{steps[-1]} is kept; the same command with --resume continues from it" if steps else
                "no checkpoint was written yet (one comes after each epoch, or every train.checkpoint_every_steps); run it again")
    elif command == "tune":
        kept = "the study keeps every finished trial (the running one is retried); the same command continues it"
    else:
        kept = "nothing of this run was published"
    return f"interrupted ({by}): {kept}"


def main(argv: list[str] | None = None) -> None:
    """Entry point. User errors -> one ``error:`` line and exit code 2; Ctrl-C and SIGTERM -> one line saying what
    was kept and how to continue (exit 130 / 143)."""
    import signal

    _setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _on_signal) for sig in handled} if _in_main_thread() else {}
    try:
        app(args=argv, prog_name="mcvqa")
    except McvqaError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    except Interrupted as e:
        typer.echo(interrupted_message(args, e.name), err=True)
        raise SystemExit(e.code) from None
    except Exception as e:
        # A full (or read-only) disk met somewhere no mcvqa code wraps it (a tracker's log, a library's cache):
        # still one line, never a traceback. Anything else is a bug and keeps its traceback.
        from mcvqa.io import disk_problem

        why = disk_problem(e)
        if why is None:
            raise
        where = getattr(e, "filename", None)
        typer.echo(f"error: {why}{f' writing {where}' if where else ''}; free some space and run the same command again"
                   " (predict and train: with --resume, which keeps the work already done)", err=True)
        raise SystemExit(2) from None
    finally:
        from mcvqa.io import stop_early

        stop_early()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run() -> None:
    """The process's entry (the ``mcvqa`` script, ``python -m mcvqa``): :func:`main`, then :func:`_leave` with its
    exit status. A traceback (a bug) takes the interpreter's own way out. Whoever calls :func:`main` in a process of
    their own (tests, a notebook) keeps it running, and so does a program beneath :func:`run` that expects control
    back (:func:`_owns_the_process`): it gets the ``SystemExit`` a normal exit raises."""
    try:
        main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    # Out of the except block: the failed command's exception, and with it every object its frames held, is let go
    # before the end, as the interpreter's own exit does, so whatever cleans up when freed still does.
    if not _owns_the_process(sys._getframe(1).f_globals):
        raise SystemExit(code)
    _leave(code)


def _owns_the_process(caller: dict[str, Any]) -> bool:
    """Whether :func:`run` was called as the program itself (``caller``: the calling module's globals): from the
    ``__main__`` module (the ``mcvqa`` script, ``python -m mcvqa``, ``runpy`` with ``alter_sys``), with no profiler
    (``python -m cProfile -m mcvqa`` writes its output after the exit) and no ``python -i`` prompt to come back to.
    A program that runs mcvqa's module in a namespace of its own (``runpy.run_module`` without ``alter_sys``)
    catches the ``SystemExit`` and goes on."""
    main_module = sys.modules.get("__main__")
    return (not sys.flags.inspect and sys.getprofile() is None
            and main_module is not None and caller is vars(main_module))


def _leave(code: object) -> None:
    """End the process with ``code`` as ``sys.exit`` would, without the interpreter's teardown.

    After any command that imported torch and transformers, Python's teardown (every module cleared, a last
    collection over their objects) keeps the process alive about a second longer (BENCHMARKS.md), and nothing
    waits on it: mcvqa's outputs are closed files by then. What a normal exit does that matters is kept, in its
    order: threads that are not daemons are waited for (idle executors told to stop first), atexit handlers run
    (logging's flush, multiprocessing reaping its children, weakref finalizers, trackers' own), and the standard
    streams are flushed.
    """
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message goes to stderr and the status is 1
        print(code, file=sys.stderr)
        status = 1
    # What the interpreter's own exit calls first: idle executor workers (torch.compile's compile pool among them)
    # are told to stop, then every thread that is not a daemon is waited for. Joining those threads directly would
    # wait forever on an executor nobody shut down. A Python without it takes its own way out.
    if not hasattr(threading, "_shutdown"):
        raise SystemExit(status)
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        # Ctrl-C while a thread the command left (a tracker's upload, say) is still waited for: stop waiting, in one
        # line rather than the traceback Python's own exit prints. The command itself had finished: its status stays.
        print("interrupted (Ctrl-C) while waiting for a background thread to finish; the command's outputs were already written", file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # after the handlers: what they print arrives too
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away (``mcvqa config | head``), a stream already closed
            pass
        except OSError as e:  # output that could not be written (``> out.txt`` on a full disk): as Python's own exit, 120
            with contextlib.suppress(OSError):
                os.write(2, f"error: the command's output could not be written ({e.strerror or e})\n".encode())
            status = status or 120
    # C's stdio buffers too (an extension's printf into a pipe): exit() flushes them, _exit does not.
    with contextlib.suppress(OSError, AttributeError, TypeError):  # no C library to load by name (Windows)
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(status)


if __name__ == "__main__":
    run()
