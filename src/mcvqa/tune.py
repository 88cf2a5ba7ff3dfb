"""``mcvqa tune``: Bayesian optimisation (TPE) with Hyperband / successive-halving pruning, via Optuna.

    mcvqa tune --config configs/seed.yaml --data train.csv --trials 40 --study runs/study.db

The search space is a YAML file next to the recipe (``configs/search_space.yaml``): one entry per config
field, e.g. ``train.lr: {type: float, low: 2e-5, high: 5e-4, log: true}``. Each trial trains on a
(subsampled) training set and reports the validation accuracy after every epoch; the pruner stops trials
that fall behind. With ``--folds K`` a trial trains K models on K folds of the subsample and its objective
is their mean accuracy (each fold's epochs are successive pruning steps).

The study lives in SQLite: a second ``mcvqa tune`` on the same ``--study`` resumes it, several can run at
once, and a trial whose process was killed is marked failed by Optuna's heartbeat and retried. ``--gpus N``
starts those processes itself (:func:`run_workers`): one worker per GPU on the one study, each pinned to its card
with ``CUDA_VISIBLE_DEVICES`` and sampling with its own seed, a worker that dies restarted once, and the summary
written once at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mcvqa.config import SECTIONS, Config, load_config, parse_overrides
from mcvqa.data import kfold_splits, read_csv, stratified_split, subsample
from mcvqa.errors import ConfigError, McvqaError
from mcvqa.io import atomic_write_json, atomic_write_text


@dataclass
class TuneOptions:
    trials: int = 40
    """Trials to run in this process (the study keeps all trials of all processes)."""
    study: Path = Path("runs/study.db")
    """SQLite file holding the study."""
    name: str = "mcvqa"
    """Study name inside the file."""
    space: Path | None = None
    """Search-space YAML (default: search_space.yaml beside the recipe, else the built-in space)."""
    subsample: int = 0
    """Train on a stratified subsample of this many rows (0: all)."""
    folds: int = 1
    """K-fold on the subsample (1: one stratified train/validation split)."""
    max_epochs: int = 3
    """Upper bound on train.epochs within a trial (the Hyperband resource)."""
    timeout: float | None = None
    """Wall-clock limit in seconds for this process."""
    pruner: str = "hyperband"
    """hyperband | sha (successive halving) | median | none."""
    seed: int = 42
    """TPE sampler seed."""
    heartbeat: int = 60
    """Seconds between trial heartbeats; a trial silent for 2 x this long is taken as killed and retried."""
    keep_trial_outputs: bool = False
    """Keep every trial's adapters and checkpoints (default: only its metrics.json)."""
    summary: bool = True
    """Write best_recipe.yaml, the plot and tune_summary.json at the end (off in the workers of ``--gpus N``)."""


DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "float", "low": 2e-5, "high": 5e-4, "log": True},
    "lora.r": {"type": "categorical", "choices": [8, 16, 32, 64]},
    "lora.alpha": {"type": "categorical", "choices": [16, 32, 64]},
    "lora.dropout": {"type": "float", "low": 0.0, "high": 0.1},
    "train.epochs": {"type": "int", "low": 1, "high": 5},
    "train.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.1},
    "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    "image.size": {"type": "categorical", "choices": [384, 448, 512]},
    "prompt.name": {"type": "categorical", "choices": ["fewshot_ko", "plain_ko"]},
    "train.option_shuffle": {"type": "categorical", "choices": [True, False]},
}


def load_space(path: Path | None, recipe: Path | None) -> dict[str, dict[str, Any]]:
    if path is None and recipe is not None:
        from mcvqa.config import resolve_recipe

        beside = resolve_recipe(recipe).parent / "search_space.yaml"
        path = beside if beside.exists() else None
    if path is None:
        return copy.deepcopy(DEFAULT_SPACE)
    try:
        space = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the search space ({e})") from None
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ConfigError(f"{path}: {key} is not a config field")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ConfigError(f"{path}: {key} needs type float, int or categorical")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise ConfigError(f"{path}: {key} needs choices")
        if spec["type"] in ("float", "int") and ("low" not in spec or "high" not in spec):
            raise ConfigError(f"{path}: {key} needs low and high")
    return space


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
        else:
            params[key] = trial.suggest_categorical(key, list(spec["choices"]))
    return params


def apply(cfg: Config, params: dict[str, Any]) -> Config:
    """``cfg`` with ``section.field`` overrides applied and validated."""
    out = copy.deepcopy(cfg)
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, _, name = key.partition(".")
        grouped.setdefault(section, {})[name] = value
    for section, values in grouped.items():
        merged = {**dataclasses.asdict(getattr(out, section)), **values}
        setattr(out, section, load_config(None, {section: merged}, env=False).__getattribute__(section))
    return out


def _independent_worker(base: Config, opts: TuneOptions) -> tuple[Config, TuneOptions]:
    """Under ``accelerate launch``, each process is an independent worker on the shared study, one per GPU.

    Trials must not form a process group (they are different models): the runtime clears the launcher's variables
    and this process is pinned to its GPU; each worker's sampler gets its own seed.
    """
    import torch

    from mcvqa.runtime import independent_worker

    worker = independent_worker()
    if worker.world <= 1:
        return base, opts
    if torch.cuda.is_available() and base.model.device == "auto":
        torch.cuda.set_device(worker.local_rank)
        base = apply(base, {"model.device": f"cuda:{worker.local_rank}"})
    return base, dataclasses.replace(opts, seed=opts.seed + worker.rank)


def score(m: dict[str, Any]) -> float:
    """Validation accuracy, ties broken by NLL: small validation sets make exact ties common, and a pruner
    cannot rank tied trials."""
    return float(m["accuracy"]) - 1e-3 * float(m["nll"])


def make_pruner(kind: str, max_resource: int) -> Any:
    import optuna

    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource, reduction_factor=3)
    if kind == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2, min_early_stopping_rate=0)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def storage(path: Path, heartbeat: int) -> Any:
    import inspect
    import warnings

    import optuna.storages as S
    from optuna.exceptions import ExperimentalWarning

    path.parent.mkdir(parents=True, exist_ok=True)
    # Heartbeats and their retry hook are marked experimental; they are what makes killed trials resumable,
    # so they are used on purpose and their warnings kept out of the user's terminal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # Optuna >= 4.9 names the retry hook heartbeat_stale_trial_callback; older releases failed_trial_callback.
        if "heartbeat_stale_trial_callback" in inspect.signature(S.RDBStorage.__init__).parameters:
            retry = {"heartbeat_stale_trial_callback": S.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        else:
            retry = {"failed_trial_callback": S.RetryFailedTrialCallback(max_retry=1)}
        return S.RDBStorage(
            url=f"sqlite:///{path.resolve()}",
            engine_kwargs={"connect_args": {"timeout": 60}},  # several workers share the file
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            **retry,
        )


def tune(
    base: Config,
    data: str | Path,
    out: str | Path,
    opts: TuneOptions,
    *,
    recipe: Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import optuna

    from mcvqa.train import train_split

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, opts = _independent_worker(base, opts)
    space = load_space(opts.space, recipe)
    ds = read_csv(data, require_answer=True, cfg=base.data)
    if opts.subsample:
        ds = subsample(ds, opts.subsample, base.data.split_seed)
    if opts.folds > 1:
        splits = [(tr, va.items) for tr, va in kfold_splits(ds, opts.folds, base.data.split_seed)]
    else:
        tr, va = stratified_split(ds, base.data.val_fraction, base.data.split_seed)
        splits = [(tr, va.items)]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=opts.name,
        storage=storage(opts.study, opts.heartbeat),
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=opts.seed, multivariate=True),
        pruner=make_pruner(opts.pruner, opts.max_epochs * len(splits)),
    )
    before = len(study.trials)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        cfg = apply(base, params)
        cfg = apply(cfg, {"train.epochs": min(cfg.train.epochs, opts.max_epochs), "train.report_to": [], "train.eval_every": "epoch"})
        trial_dir = out / f"trial_{trial.number:04d}"
        if trial_dir.exists():  # a retried trial starts clean
            shutil.rmtree(trial_dir)
        scores: list[float] = []
        accuracies: list[float] = []
        try:
            for k, (train_items, val_items) in enumerate(splits):

                def report(epoch: int, m: dict[str, Any], k: int = k) -> None:
                    trial.report(score(m), k * opts.max_epochs + epoch - 1)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"fold {k}, epoch {epoch}: accuracy {m['accuracy']:.4f}")

                res = train_split(cfg, train_items, val_items, trial_dir / f"fold_{k}", progress=progress, log_fn=lambda s: None, on_epoch_end=report)
                scores.append(score(res.best_metrics))
                accuracies.append(float(res.best_metrics["accuracy"]))
            value = float(sum(scores) / len(scores))
            accuracy = float(sum(accuracies) / len(accuracies))
            # What was measured, for the summary and the recipe: the objective adds a tie-break on NLL to the accuracy,
            # and --max-epochs may have cut the sampled epochs.
            trial.set_user_attr("fold_accuracies", accuracies)
            trial.set_user_attr("accuracy", accuracy)
            trial.set_user_attr("epochs_trained", cfg.train.epochs)
            log(f"trial {trial.number}: accuracy {accuracy:.4f}  " + " ".join(f"{k}={v}" for k, v in params.items()))
            return value
        except optuna.TrialPruned:
            log(f"trial {trial.number}: pruned  " + " ".join(f"{k}={v}" for k, v in params.items()))
            raise
        finally:
            if not opts.keep_trial_outputs and trial_dir.exists():
                for sub in trial_dir.glob("fold_*"):
                    for name in ("best", "last", "checkpoints", "logs"):
                        shutil.rmtree(sub / name, ignore_errors=True)

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=opts.trials, timeout=opts.timeout, catch=(McvqaError,))
    if not opts.summary:  # a worker of run_workers: the launcher summarises the whole study once
        return {"new_trials": len(study.trials) - before}
    return summarise(study, base, space, out, recipe, before, time.perf_counter() - t0, log)


@dataclass
class Worker:
    """One worker process of :func:`run_workers`."""

    index: int
    trials: int
    device: str | None
    """The ``CUDA_VISIBLE_DEVICES`` value it gets (one card), or None on CPU."""
    done: int = 0
    """Trials it reported finished (complete or pruned), for a restart's remaining count."""
    restarts: int = 0


def split_trials(total: int, workers: int) -> list[int]:
    """``total`` trials over ``workers`` processes, the first ones taking the remainder."""
    return [total // workers + (1 if i < total % workers else 0) for i in range(workers)]


def worker_devices(n: int, visible: str | None, gpus_available: int) -> list[str | None]:
    """The card each of ``n`` workers is pinned to: the i-th entry of an existing ``CUDA_VISIBLE_DEVICES`` (ids or
    UUIDs), else GPU i; all None when there is no GPU (CPU workers). More workers than cards is refused."""
    if gpus_available == 0:
        return [None] * n
    cards = [c.strip() for c in visible.split(",") if c.strip()] if visible else [str(i) for i in range(gpus_available)]
    if n > len(cards):
        raise McvqaError(f"--gpus {n}: only {len(cards)} GPU{'s' if len(cards) != 1 else ''} visible; use --gpus {len(cards)} or fewer")
    return cards[:n]


def _line(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def _worker_main(base: Config, data: str, out: str, opts: TuneOptions, recipe: str | None, device: str | None, log_path: str) -> None:
    """One worker of :func:`run_workers`, in its own (spawned) interpreter: pinned to its card before anything touches
    CUDA, outside any launcher's process group, its output to its log file."""
    import os
    import sys

    from mcvqa.config import LAUNCHER_VARIABLES

    for key in LAUNCHER_VARIABLES:
        os.environ.pop(key, None)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    fh = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - the process's stdout/stderr until it ends
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    tune(base, data, out, opts, recipe=Path(recipe) if recipe else None, progress=False, log=_line)


def run_workers(
    base: Config,
    data: str | Path,
    out: str | Path,
    opts: TuneOptions,
    workers: int,
    *,
    recipe: Path | None = None,
    log: Callable[[str], None] = print,
    max_restarts: int = 1,
) -> dict[str, Any]:
    """``mcvqa tune --gpus N``: N worker processes on one study, then one summary.

    Each worker runs :func:`tune` on the same study with its share of the trials and its own sampler seed, pinned to
    one card, writing no summary; its lines are relayed here with its index in front (and kept in
    ``OUT/worker_I.log``). A worker that dies (killed, out of memory) is started again up to ``max_restarts`` times for
    the trials it had left; the trial it was running goes stale on Optuna's heartbeat and is retried by the next
    worker to ask for one. Ctrl-C / SIGTERM stop every worker (their finished trials stay in the study). Returns the
    summary of the whole study, as :func:`tune` does. Workers are started with ``multiprocessing`` (spawn), never a
    command line.
    """
    import multiprocessing as mp
    import os
    import threading

    import optuna
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(opts.space, recipe)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Created here, once, before the workers race to create it.
    study = optuna.create_study(study_name=opts.name, storage=storage(opts.study, opts.heartbeat), load_if_exists=True, direction="maximize")
    before = len(study.trials)
    gpus = torch.cuda.device_count() if base.model.device == "auto" or base.model.device.startswith("cuda") else 0
    devices = worker_devices(workers, os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)
    if gpus:
        base = apply(base, {"model.device": "cuda"})  # each worker sees its one card as cuda:0
    pool = [Worker(i, n, d) for i, (n, d) in enumerate(zip(split_trials(opts.trials, workers), devices)) if n > 0]
    where = ", ".join(f"worker {w.index} on {'GPU ' + w.device if w.device is not None else 'CPU'} ({w.trials} trials)" for w in pool)
    log(f"{len(pool)} workers on study '{opts.name}' in {opts.study}: {where}")
    ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state, no launcher group inherited
    stop = threading.Event()

    def start(w: Worker) -> tuple[Any, threading.Thread]:
        log_path = out / f"worker_{w.index}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        worker_opts = dataclasses.replace(opts, trials=w.trials - w.done, seed=opts.seed + w.index + 1000 * w.restarts, summary=False)
        proc = ctx.Process(target=_worker_main, args=(base, str(data), str(out), worker_opts, str(recipe) if recipe else None, w.device, str(log_path)),
                           name=f"mcvqa-tune-worker-{w.index}")
        proc.start()

        def relay() -> None:  # follow the worker's log file until it has ended and the file is read
            pending = ""
            while True:
                alive = proc.is_alive()
                if log_path.exists():
                    with log_path.open(encoding="utf-8", errors="replace") as fh:
                        fh.seek(offset_box[0])
                        chunk = fh.read()
                        offset_box[0] = fh.tell()
                    pending += chunk
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        if line.startswith("trial ") and (": accuracy" in line or ": pruned" in line):
                            w.done += 1
                        log(f"[worker {w.index}] {line}")
                if not alive or stop.is_set():
                    if pending:
                        log(f"[worker {w.index}] {pending}")
                    return
                time.sleep(0.2)

        offset_box = [offset]
        thread = threading.Thread(target=relay, daemon=True)
        thread.start()
        return proc, thread

    running: dict[int, tuple[Worker, Any, threading.Thread]] = {}

    def record() -> None:  # which process is which worker: for a user who wants to stop one (or a test that kills one)
        atomic_write_json(out / "workers.json", {str(i): {"pid": p.pid, "device": w.device, "restarts": w.restarts} for i, (w, p, _) in running.items()})

    t0 = time.perf_counter()
    failed: list[str] = []
    try:
        for w in pool:
            running[w.index] = (w, *start(w))
        record()
        while running:
            time.sleep(0.2)
            for index, (w, proc, thread) in list(running.items()):
                if proc.is_alive():
                    continue
                thread.join(timeout=5)
                del running[index]
                code = proc.exitcode
                if code == 0 or w.done >= w.trials:
                    continue
                if w.restarts < max_restarts:
                    w.restarts += 1
                    log(f"worker {index} ended with exit code {code} after {w.done} of {w.trials} trials; starting it again")
                    running[index] = (w, *start(w))
                    record()
                else:
                    failed.append(f"worker {index} (exit code {code})")
    finally:
        stop.set()
        for _, proc, _ in running.values():  # interrupted: stop the workers, their finished trials are in the study
            proc.terminate()
        for _, proc, _ in running.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if failed:
        log(f"gave up on {', '.join(failed)}; the study keeps what they finished")
    study = optuna.load_study(study_name=opts.name, storage=storage(opts.study, opts.heartbeat))
    summary = summarise(study, base, space, out, recipe, before, time.perf_counter() - t0, log)
    summary["workers"] = len(pool)
    atomic_write_json(out / "tune_summary.json", summary)
    return summary


def summarise(study: Any, base: Config, space: dict[str, Any], out: Path, recipe: Path | None, before: int, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Best recipe YAML, importances, history plot and a JSON summary."""
    import optuna

    states = [t.state.name for t in study.trials]
    summary: dict[str, Any] = {
        "trials": len(study.trials),
        "new_trials": len(study.trials) - before,
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "seconds": round(seconds, 1),
    }
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        atomic_write_json(out / "tune_summary.json", summary)
        log("no trial completed yet")
        return summary
    best = study.best_trial
    accuracy = float(best.user_attrs.get("accuracy", best.value))
    summary.update({"best_accuracy": accuracy, "best_value": best.value, "best_trial": best.number, "best_params": best.params})
    try:
        summary["importances"] = optuna.importance.get_param_importances(study) if len(complete) >= 2 else {}
    except (RuntimeError, ValueError, ZeroDivisionError):
        summary["importances"] = {}
    best_cfg = apply(base, best.params)
    trained = best.user_attrs.get("epochs_trained")
    capped = ""
    if trained is not None and trained != best_cfg.train.epochs:
        capped = f"# train.epochs is what the trial trained: {trained:g} (it sampled {best_cfg.train.epochs:g}; --max-epochs capped it)\n"
        best_cfg = apply(best_cfg, {"train.epochs": trained})
    recipe_text = (
        f"# Best of {summary['trials']} trials in study '{study.study_name}' (validation accuracy {accuracy:.4f}),\n"
        f"# found by `mcvqa tune`{f' from {recipe}' if recipe else ''}. Train it:\n"
        f"#   mcvqa train --config {out / 'best_recipe.yaml'} --data train.csv --out runs/best\n"
        + capped
        + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False, allow_unicode=True)
    )
    atomic_write_text(out / "best_recipe.yaml", recipe_text)
    plot_history(study, out / "optimization_history.png")
    atomic_write_json(out / "tune_summary.json", summary)
    log(f"best trial {best.number}: accuracy {accuracy:.4f}")
    for k, v in best.params.items():
        log(f"  {k} = {v}")
    if summary["importances"]:
        log("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items()))
    log(f"{summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed; recipe {out / 'best_recipe.yaml'}")
    return summary


def plot_history(study: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    from mcvqa.plotting import setup

    setup()
    import optuna

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    if done:
        ax.scatter([t.number for t in done], [t.value for t in done], label="complete", color="tab:blue", zorder=3)
        best, xs, ys = -1.0, [], []
        for t in sorted(done, key=lambda t: t.number):
            best = max(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        last = [max(t.intermediate_values.values()) if t.intermediate_values else 0.0 for t in pruned]
        ax.scatter([t.number for t in pruned], last, marker="x", color="gray", label="pruned (last report)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"mcvqa tune: {study.study_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["TuneOptions", "tune", "load_space", "apply", "DEFAULT_SPACE", "parse_overrides"]
