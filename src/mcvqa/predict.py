"""``mcvqa predict``: a test CSV in, ``submission.csv`` and ``probs.csv`` out. The recipe: read, journal, score
through the engine (plain, generate or a test-time method), write.

Crash safety lives in :mod:`mcvqa.engine`: every scored batch is journaled (fsync'd) before the next starts, so
``--resume`` re-scores exactly the batches that were missing and the result is byte-identical to an
uninterrupted run. Final files are validated, then written under temporary names and renamed together.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mcvqa import families
from mcvqa.config import ADAPTER_TTA, GRADIENT_TTA, Config
from mcvqa.data import Dataset, read_csv
from mcvqa.engine import JOURNAL, Engine, Journal, Scored, ScoreStats, _file_identity, fingerprint, score_items_generate
from mcvqa.errors import McvqaError
from mcvqa.features import Encoder
from mcvqa.io import Staged
from mcvqa.outputs import write_outputs, write_per_order
from mcvqa.prompts import load_prompt
from mcvqa.runtime import distributed, frozen_heap, seconds_since_process_start
from mcvqa.scoring import Scorer

__all__ = ["JOURNAL", "PredictResult", "build_scorer", "predict"]


# ------------------------------------------------------------------------------------------ command


@dataclass
class PredictResult:
    out: Path
    submission: Path
    probs: Path
    n: int
    seconds: float
    stats: ScoreStats
    resumed_batches: int = 0

    @property
    def questions_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def build_scorer(
    cfg: Config, adapter: str | Path | None = None, model: Any = None, processor: Any = None, laps: dict[str, float] | None = None,
    on_processor: Callable[[Any, families.Family, Any], None] | None = None, encoder: Callable[[], Encoder | None] | None = None,
) -> Scorer:
    """The prediction scorer: the model loaded (``on_processor`` as :func:`mcvqa.model.load_model` takes it), its
    4-bit weights unpacked and an adapter merged where that pays, its encoder and kernels set.

    ``encoder()``, when given, may return an encoder made from this processor, prompt and image settings before the
    weights were loaded (``predict``'s early loader); it is used when its family and pixel dtype are the loaded
    model's, so the batches it already made are the ones this scorer needs."""
    from mcvqa.model import load_model

    if model is None:
        model, processor = load_model(cfg.model, adapter, laps, on_processor)
        if cfg.model.quant in ("nf4", "fp4"):
            from mcvqa.model import unpack_4bit

            t = time.perf_counter()
            # Methods that take gradients through the model keep the 8 GiB headroom for their backward: auto stays packed.
            mode = "off" if cfg.predict.unpack_4bit == "auto" and set(cfg.tta.methods) & GRADIENT_TTA else cfg.predict.unpack_4bit
            if unpack_4bit(model, mode) and laps is not None:
                laps["unpack_4bit"] = round(time.perf_counter() - t, 3)
        if adapter is not None and cfg.predict.merge_adapter == "auto" and not set(cfg.tta.methods) & ADAPTER_TTA:
            from mcvqa.model import merge_adapter

            t = time.perf_counter()
            model, merged = merge_adapter(model)
            if merged and laps is not None:
                laps["merge_adapter"] = round(time.perf_counter() - t, 3)
    family = families.for_model(model)
    pixel_dtype = family.pixel_dtype(family.core_and_head(model)[0])
    early = encoder() if encoder is not None else None
    if early is not None and type(early.family) is type(family) and early.pixel_dtype == pixel_dtype:
        enc = early
    else:
        enc = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image, family, pixel_dtype)
    if cfg.predict.compile != "off":
        from mcvqa.kernels import compile_blocks
        from mcvqa.families import core_and_head

        compile_blocks(core_and_head(model)[0], cfg.predict.compile)
    # Whole compiled decoder layers would trace the kept rows' bookkeeping and break their graphs on it.
    return Scorer(model, enc, prefix_cache=cfg.predict.prefix_cache, keep_rows=cfg.predict.prefix_rows and cfg.predict.compile != "layers")


def _stage_summary(
    staged: Staged, out: Path, cfg: Config, ds: Dataset, seconds: float, load_seconds: float, stats: ScoreStats,
    adapter: str | Path | None, done: dict[int, Any], tta_result: Any, timeline: dict[str, float | None] | None = None,
) -> None:
    staged.json(
        out / "predict_summary.json",
        {
            "questions": len(ds),
            "seconds": round(seconds, 3),
            "questions_per_second": round(len(ds) / seconds, 3) if seconds else None,
            "load_seconds": round(load_seconds, 3),
            "batch_size": cfg.predict.batch_size,
            "batch_size_used": stats.batch_size_used or cfg.predict.batch_size,
            "oom_halvings": stats.oom_halvings,
            "bad_images": len(stats.bad_images),
            "generate_unparsed": stats.generate_unparsed if cfg.predict.scoring == "generate" else None,
            "model": cfg.model.name_or_path,
            "adapter": str(adapter) if adapter else None,
            "resumed_batches": len(done),
            "tta": list(cfg.tta.methods),
            "tta_cost_per_question": None if tta_result is None else {"forwards": tta_result.cost.forwards, "backwards": tta_result.cost.backwards},
            "tta_notes": None if tta_result is None else tta_result.notes,
            "timeline": timeline or {},
        },
    )


def predict(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    scorer: Scorer | None = None,
    dataset: Dataset | None = None,
    log: Callable[[str], None] = print,
) -> PredictResult:
    """Read -> journal -> load -> score through the engine -> write (rank 0) -> close the journal."""
    timeline: dict[str, float | None] = {"process_start_to_predict": seconds_since_process_start()}
    t_read = time.perf_counter()
    out = Path(out)
    if adapter is not None and scorer is None:
        from mcvqa.model import check_adapter_folder

        check_adapter_folder(adapter)  # a full-model folder passed as --adapter is refused before anything loads
    ds = dataset if dataset is not None else read_csv(data, cfg=cfg.data, on_bad_image=cfg.predict.on_bad_image)
    timeline["read"] = round(time.perf_counter() - t_read, 3)
    dist = distributed()
    out.mkdir(parents=True, exist_ok=True)
    journal = _journal(out, cfg, ds, adapter, dist)
    if journal.path.exists() and not resume:
        raise McvqaError(f"{out} holds an unfinished run ({journal.path.name}); pass --resume to continue it or use another --out")
    t0 = time.perf_counter()
    if resume and not journal.path.exists():
        finished = Journal(journal.path.with_name(journal.path.name + ".done"), journal.fingerprint)
        if finished.path.exists() and (out / "submission.csv").exists():
            finished.load()  # refuses a finished run of other settings
            log(f"{out}: this run is already finished ({out / 'submission.csv'}); nothing to resume")
            summary = json.loads((out / "predict_summary.json").read_text(encoding="utf-8")) if (out / "predict_summary.json").exists() else {}
            return PredictResult(out, out / "submission.csv", out / "probs.csv", len(ds), float(summary.get("seconds", 0.0)), ScoreStats(), 0)
        log(f"no unfinished run in {out} to resume; starting fresh")
    done = journal.load() if resume else {}
    t_load = time.perf_counter()
    laps: dict[str, float] = {}

    # Every path runs batch by batch through the engine: journaled (--resume), sharded, bad-image policy.
    def engine_for(encoder: Encoder) -> Engine:
        return Engine(
            ds.items, encoder, cfg.predict.batch_size, journal, done, dist, cfg.predict.on_bad_image, ds.source, ScoreStats(), progress,
            num_workers=cfg.predict.num_workers,
        )

    early: list[Engine] = []

    def start_loader(processor: Any, family: families.Family, dtype: Any) -> None:
        """The first pass's batches depend on the processor, not the weights (plain scoring, or the orders of
        ``--tta orders``): its workers start while they load."""
        if cfg.predict.scoring != "logits" or not cfg.predict.early_loader:
            return
        t = time.perf_counter()
        wrapped = None
        if adapter is not None:
            from mcvqa.model import adapter_wraps

            try:
                wrapped = adapter_wraps(adapter)
            except (OSError, ValueError):  # an unreadable adapter config fails in the load, with its own message
                return
        encoder = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image, family, family.pixel_dtype_for(dtype, wrapped))
        if cfg.tta.methods:
            from mcvqa.tta.compose import first_pass

            spec = first_pass(cfg.tta, encoder, len(ds))
        else:
            spec = {"with_prefix": not (cfg.predict.prefix_cache and family.prefix_cache), "sort_by_length": cfg.predict.sort_by_length}
        if spec is None:
            return
        early.append(engine_for(encoder))
        laps["early_encoder"] = round(time.perf_counter() - t, 3)
        early[0].start(**spec, laps=laps)

    try:
        scorer = scorer or build_scorer(cfg, adapter, laps=laps, on_processor=start_loader, encoder=lambda: early[0].encoder if early else None)
        load_seconds = time.perf_counter() - t_load
        journal.start()  # after loading: a model that fails to load leaves no journal to trip over
        if done:
            log(f"resuming: {sum(len(r['ids']) for r in done.values())} of {len(ds)} questions already scored")
        if early and early[0].encoder is scorer.encoder:
            engine = early[0]
        else:
            for e in early:
                e.stop()  # made for another encoder than the loaded model needs
            engine = engine_for(scorer.encoder)
        with frozen_heap():  # the loaded model is never garbage: full collections would stall the GPU (runtime.frozen_heap)
            probs, tta_result = _score(cfg, scorer, engine)
    finally:
        for e in early:
            e.stop()  # workers not taken by the scoring (a failed load, a journal that cannot be written) end here
    seconds = time.perf_counter() - t0
    stats = engine.stats
    timeline |= {"load": round(load_seconds, 3), **{f"load_{k}": v for k, v in laps.items()}, "first_batch": stats.first_batch_seconds, "score": round(seconds - load_seconds, 3)}
    result = PredictResult(out, out / "submission.csv", out / "probs.csv", len(ds), seconds, stats, len(done))
    if dist.main:  # rank 0 writes the one submission; the others only close their journals
        _write(out, cfg, ds, probs, tta_result, adapter, seconds, load_seconds, stats, done, timeline)
    else:
        dist.barrier()
    # The run is complete and its outputs are on disk: the journal has done its job.
    journal.path.replace(journal.path.with_name(journal.path.name + ".done"))
    if not dist.main:
        return result
    dist.barrier()
    if stats.oom_halvings:
        log(f"GPU memory ran out {stats.oom_halvings} time(s); continued with batch size {stats.batch_size_used}")
    if stats.bad_images:
        log(f"{len(stats.bad_images)} image(s) could not be read and were answered with a blank image; see {out / 'bad_images.csv'}")
    if cfg.predict.scoring == "generate" and stats.generate_unparsed:
        log(f"generate: {stats.generate_unparsed} answer(s) had no parseable letter; used the first-step letter scores")
    return result


def _journal(out: Path, cfg: Config, ds: Dataset, adapter: str | Path | None, dist: Any) -> Journal:
    """This process's journal, fingerprinted with everything that changes the scores (so resume can't mix runs)."""
    path = out / (JOURNAL if dist.world == 1 else f"journal.rank{dist.rank}-of-{dist.world}.jsonl")
    fp = fingerprint(
        {
            "model": cfg.model.name_or_path,
            "quant": cfg.model.quant,
            "adapter": _file_identity(Path(adapter) / "adapter_model.safetensors") if adapter else None,
            "data": str(ds.source),
            "ids": hashlib.sha256("\n".join(it.id for it in ds).encode()).hexdigest(),
            "prompt": cfg.prompt.name,
            "image": cfg.to_dict()["image"],
            "batch_size": cfg.predict.batch_size,
            "scoring": cfg.predict.scoring,
            "sort_by_length": cfg.predict.sort_by_length,
            "world": dist.world,
            "tta": cfg.to_dict()["tta"] if cfg.tta.methods else None,
        }
    )
    return Journal(path, fp)


def _score(cfg: Config, scorer: Scorer, engine: Engine) -> tuple[np.ndarray, Any]:
    """(N, 4) probabilities by the configured path: a test-time method, generate, or plain logits."""
    if cfg.tta.methods:
        from mcvqa.tta import run

        tta_result = run(scorer, engine.items, cfg.tta, engine)
        return tta_result.probs, tta_result
    if cfg.predict.scoring == "generate":
        stats = engine.stats
        gen = lambda qs: Scored(score_items_generate(scorer.model, scorer.encoder, qs, max_new_tokens=cfg.predict.max_new_tokens, stats=stats))  # noqa: E731
        return engine.map("generate", range(len(engine.items)), gen, "generate", batch_size=max(1, cfg.predict.batch_size)).probs, None
    return engine.score(scorer, sort_by_length=cfg.predict.sort_by_length).probs, None


def _write(
    out: Path, cfg: Config, ds: Dataset, probs: np.ndarray, tta_result: Any, adapter: str | Path | None, seconds: float,
    load_seconds: float, stats: ScoreStats, done: dict[Any, Any], timeline: dict[str, float | None] | None = None,
) -> None:
    """Every output staged and renamed into place together: a full disk leaves none of them, and the journal stays,
    so ``--resume`` writes them once there is space (the scoring is not repeated)."""
    ids = [it.id for it in ds]
    staged = Staged()
    try:
        write_outputs(out, ids, probs, staged)
        staged.text(out / "config.yaml", cfg.to_yaml())
        if stats.bad_images:
            staged.csv(out / "bad_images.csv", pd.DataFrame(stats.bad_images, columns=["id", "problem"]))
        if tta_result is not None and tta_result.per_order is not None:
            write_per_order(out / "per_order.csv", ids, tta_result.per_order, staged)
        _stage_summary(staged, out, cfg, ds, seconds, load_seconds, stats, adapter, done, tta_result, timeline)
    except BaseException:
        staged.discard()
        raise
    staged.commit()
