"""``mcvqa predict``: a test CSV in, ``submission.csv`` and ``probs.csv`` out.

Crash safety: every scored batch is appended to a journal (fsync'd) before the next starts. Batches are
fixed slices of the test set, so ``--resume`` re-scores exactly the batches that were missing and the
result is byte-identical to an uninterrupted run. Final files are validated, then written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mcvqa.config import LETTERS, Config
from mcvqa.data import Dataset, Item, read_csv
from mcvqa.errors import DataError, McvqaError
from mcvqa.features import Batch, Collator, Encoder, ItemDataset, collate, resolve_num_workers, token_lengths
from mcvqa.io import Staged, disk_error, disk_problem
from mcvqa.prompts import load_prompt
from mcvqa.scoring import Scorer, parse_letter, score_generate

JOURNAL = "journal.jsonl"


# ------------------------------------------------------------------------------------------ outputs


def validate_submission(df: pd.DataFrame, test_ids: Sequence[str]) -> None:
    """Every test id exactly once, in the test CSV's order, letters a-d only. Raises before anything is written."""
    if list(df.columns) != ["id", "answer"]:
        raise McvqaError(f"submission columns are {list(df.columns)}, expected ['id', 'answer']")
    ids = df["id"].tolist()
    if len(ids) != len(test_ids):
        raise McvqaError(f"submission has {len(ids)} rows for {len(test_ids)} test ids")
    if ids != list(test_ids):
        first = next(i for i, (a, b) in enumerate(zip(ids, test_ids)) if a != b)
        raise McvqaError(f"submission row {first + 1} is id {ids[first]!r}, expected {test_ids[first]!r} (same order as the test CSV)")
    bad = df.loc[~df["answer"].isin(LETTERS)]
    if len(bad):
        raise McvqaError(f"submission id {bad.iloc[0]['id']!r} has answer {bad.iloc[0]['answer']!r}, not one of a, b, c, d")


def validate_probs(probs: np.ndarray, ids: Sequence[str]) -> None:
    """Every row four finite, non-negative probabilities summing to 1: a NaN row would argmax to 'a' silently."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), 4):
        raise McvqaError(f"probabilities have shape {probs.shape} for {len(ids)} test ids; expected ({len(ids)}, 4)")
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (np.abs(probs.sum(axis=1) - 1.0) > 1e-6)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise McvqaError(
            f"probabilities of id {ids[r]!r} are {probs[r].tolist()} (not four finite non-negative numbers summing to 1); "
            "nothing was written"
        )


def write_outputs(out: Path, ids: Sequence[str], probs: np.ndarray, staged: Staged | None = None) -> tuple[Path, Path]:
    """``submission.csv`` (id,answer) and ``probs.csv`` (id,p_a..p_d,answer), validated, then written together:
    both appear, or (disk full) neither. With ``staged`` they join a larger set committed by the caller."""
    if staged is None:
        with Staged() as own:
            return write_outputs(out, ids, probs, own)
    validate_probs(probs, ids)
    answers = [LETTERS[int(k)] for k in probs.argmax(axis=1)]
    sub = pd.DataFrame({"id": list(ids), "answer": answers})
    validate_submission(sub, ids)
    pr = pd.DataFrame({"id": list(ids), **{f"p_{l}": probs[:, i] for i, l in enumerate(LETTERS)}, "answer": answers})
    probs_path = staged.csv(out / "probs.csv", pr, float_format="%.8g")
    sub_path = staged.csv(out / "submission.csv", sub)
    return sub_path, probs_path


def write_per_order(path: Path, ids: Sequence[str], per_order: np.ndarray, staged: Staged) -> Path:
    """``id,order,p_a..p_d`` for each option order scored (by original option): what CircularEval needs."""
    n, v, _ = per_order.shape
    df = pd.DataFrame(
        {"id": np.repeat(list(ids), v), "order": np.tile(np.arange(v), n), **{f"p_{l}": per_order[:, :, k].reshape(-1) for k, l in enumerate(LETTERS)}}
    )
    return staged.csv(path, df, float_format="%.8g")


# ------------------------------------------------------------------------------------------ journal


class Journal:
    """Append-only record of scored batches; the first line fingerprints the run so resume can't mix runs."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict[int, dict[str, Any]]:
        """Completed batches by index. A torn last line (killed mid-write) is ignored."""
        if not self.path.exists():
            return {}
        done: dict[int, dict[str, Any]] = {}
        with self.path.open(encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        if not lines or not lines[0]:
            return {}
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            return {}
        if head.get("fingerprint") != self.fingerprint:
            raise McvqaError(
                f"{self.path}: written by a different model, adapter, data or settings; "
                "use another --out, or delete the journal to start over"
            )
        for line in lines[1:]:
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # torn write at the moment of the kill: everything before it is intact
            done[int(rec["batch"])] = rec
        return done

    def start(self) -> None:
        try:
            self._start()
        except OSError as e:
            if disk_problem(e):
                raise disk_error(e, self.path) from None
            raise

    def _start(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", encoding="utf-8") as fh:
                fh.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        else:
            # Drop a torn tail so the next append starts on a fresh line.
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                with self.path.open("r+b") as fh:
                    fh.truncate(cut)

    def append(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:  # a torn last line is ignored by load(): the batch is simply scored again
            if disk_problem(e):
                raise disk_error(e, self.path) from None
            raise


def _file_identity(path: Path) -> list[Any]:
    """Where a file is and which version of it: an adapter retrained into the same folder is another run."""
    st = path.stat() if path.exists() else None
    return [str(path.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None]


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ scoring loop


@dataclass
class ScoreStats:
    batch_size_used: int = 0
    oom_halvings: int = 0
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    generate_unparsed: int = 0


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def score_batch_with_backoff(scorer: Scorer, batch: Batch, stats: ScoreStats) -> torch.Tensor:
    """Log-probs for a batch; on GPU out-of-memory, split it in halves and carry on (and remember the size)."""
    try:
        lp = scorer.logprobs(batch)
        stats.batch_size_used = max(stats.batch_size_used, len(batch)) if stats.oom_halvings == 0 else stats.batch_size_used
        return lp
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e) or len(batch) == 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    stats.oom_halvings += 1
    half = len(batch) // 2
    stats.batch_size_used = half if stats.batch_size_used == 0 else min(stats.batch_size_used, half)
    parts = [_slice(batch, 0, half), _slice(batch, half, len(batch))]
    return torch.cat([score_batch_with_backoff(scorer, p, stats) for p in parts])


def _slice(batch: Batch, a: int, b: int) -> Batch:
    patches = (batch.image_grid_thw.prod(-1)).tolist()
    start = int(sum(patches[:a]))
    stop = int(sum(patches[:b]))
    width = int(batch.lengths[a:b].max())
    return Batch(
        ids=batch.ids[a:b],
        input_ids=batch.input_ids[a:b, :width],
        mm_token_type_ids=batch.mm_token_type_ids[a:b, :width],
        lengths=batch.lengths[a:b],
        pixel_values=batch.pixel_values[start:stop],
        image_grid_thw=batch.image_grid_thw[a:b],
        labels=None if batch.labels is None else batch.labels[a:b],
        prefix_len=batch.prefix_len,
        bad_images=batch.bad_images[a:b],
    )


@dataclass
class Dist:
    """This process's place under ``accelerate launch`` / ``torchrun`` (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def distributed() -> Dist:
    """Initialise the process group when launched with several processes (gloo on CPU, NCCL on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Dist(state.process_index, state.num_processes)


def batch_slices(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def iterate_batches(
    items: Sequence[Item],
    encoder: Encoder,
    batches: Sequence[Sequence[int]],
    *,
    with_prefix: bool,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Batches in the given order; images decoded in ``num_workers`` processes, overlapped with scoring."""
    ds = ItemDataset(items, encoder, on_bad_image="skip")  # the caller decides whether a bad image is fatal
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=[list(b) for b in batches],
        collate_fn=Collator(encoder, with_prefix=with_prefix),
        num_workers=resolve_num_workers(num_workers),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),  # leave the global RNG alone (see train.py)
    )
    yield from loader


def score_items(
    scorer: Scorer,
    items: Sequence[Item],
    batch_size: int,
    *,
    num_workers: int = 0,
    on_bad_image: str = "fail",
    progress: bool = True,
    journal: Journal | None = None,
    done: dict[int, dict[str, Any]] | None = None,
    source: Path | None = None,
    desc: str = "scoring",
    stats: ScoreStats | None = None,
    sort_by_length: bool = True,
    dist: Dist | None = None,
) -> np.ndarray:
    """(N, 4) probabilities in item order. Skips batches already in ``done`` (resume).

    With ``sort_by_length`` the batches hold questions of similar token length (less padding); the order is
    a pure function of the data, so a resumed run forms exactly the same batches. Under several processes
    (``dist``) process r scores batches r, r + world, ...; every process ends with all probabilities.
    """
    dist = dist or Dist()
    stats = stats if stats is not None else ScoreStats()
    done = done or {}
    n = len(items)
    if sort_by_length and n > batch_size:
        lengths = token_lengths(items, scorer.encoder)
        order = sorted(range(n), key=lambda i: (lengths[i], i))
        slices = [[order[i] for i in s] for s in batch_slices(n, batch_size)]
    else:
        slices = batch_slices(n, batch_size)
    probs = np.zeros((n, 4), dtype=np.float64)
    todo = []
    for b, idx in enumerate(slices):
        if b % dist.world != dist.rank:
            continue
        if b in done and done[b]["ids"] == [items[i].id for i in idx]:
            probs[idx] = np.asarray(done[b]["probs"], dtype=np.float64)
            stats.bad_images += [tuple(x) for x in done[b].get("bad", [])]
        else:
            todo.append(b)
    mine = sum(len(s) for b, s in enumerate(slices) if b % dist.world == dist.rank)
    bar = tqdm(total=mine, initial=mine - sum(len(slices[b]) for b in todo), desc=desc, unit="q", disable=not progress or not dist.main, dynamic_ncols=True)
    row_of = {it.id: it.row for it in items}
    batches = iterate_batches(items, scorer.encoder, [slices[b] for b in todo], with_prefix=scorer.with_prefix_in_batch, num_workers=num_workers)
    for b, batch in zip(todo, batches):
        bad = [(i, why) for i, why in zip(batch.ids, batch.bad_images) if why]
        if bad and on_bad_image == "fail":
            rid, why = bad[0]
            raise DataError(
                source or "data", f"image of id {rid}: {why}", row=row_of.get(rid), column="path",
                fix="fix the file, or pass --on-bad-image skip to answer it from the text with a blank image",
            )
        lp = score_batch_with_backoff(scorer, batch, stats)
        p = lp.exp().double().cpu().numpy()
        p = p / p.sum(axis=1, keepdims=True)
        probs[slices[b]] = p
        stats.bad_images += bad
        if journal is not None:
            journal.append({"batch": b, "ids": batch.ids, "probs": p.tolist(), "bad": bad})
        bar.update(len(batch))
    bar.close()
    if dist.world > 1:
        # Each process scored its share; every process gets the whole table (small: N x 4 floats).
        mine_rows = [i for b, s in enumerate(slices) if b % dist.world == dist.rank for i in s]
        for rows, part, bad_part in dist.gather((mine_rows, probs[mine_rows], stats.bad_images)):
            probs[rows] = part
            if bad_part is not stats.bad_images:
                stats.bad_images += bad_part
    return probs


def score_items_generate(model: Any, encoder: Encoder, items: Sequence[Item], *, max_new_tokens: int, progress: bool, stats: ScoreStats) -> np.ndarray:
    """The reference's method, kept for comparison: one ``generate`` per question, parse the letter."""
    probs = np.zeros((len(items), 4))
    for i, it in enumerate(tqdm(items, desc="generate", unit="q", disable=not progress, dynamic_ncols=True)):
        ex = encoder.encode(it, on_bad_image="skip")
        batch = collate([ex], encoder.pad_id, encoder.image_token_id, encoder.prefix_ids)
        res = score_generate(model, encoder, batch, max_new_tokens)[0]
        p = res.logprobs.exp().double().numpy()
        if res.parsed is None:
            stats.generate_unparsed += 1  # explicit, counted fallback: argmax of the first step's letter scores
        else:
            # The reference's answer is the parsed letter; keep the probabilities but make the parsed letter win.
            p = p.copy()
            p[res.parsed] = max(p[res.parsed], p.max() + 1e-9)
            p = p / p.sum()
        probs[i] = p
    return probs


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


def build_scorer(cfg: Config, adapter: str | Path | None = None, model: Any = None, processor: Any = None) -> Scorer:
    from mcvqa.model import load_model

    if model is None:
        model, processor = load_model(cfg.model, adapter)
    encoder = Encoder(processor, load_prompt(cfg.prompt.name), cfg.image)
    if cfg.predict.compile != "off":
        from mcvqa.scoring import compile_blocks

        compile_blocks(model, cfg.predict.compile)
    return Scorer(model, encoder, prefix_cache=cfg.predict.prefix_cache)



def _stage_summary(
    staged: Staged, out: Path, cfg: Config, ds: Dataset, seconds: float, load_seconds: float, stats: ScoreStats,
    adapter: str | Path | None, done: dict[int, Any], tta_result: Any,
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
    out = Path(out)
    if adapter is not None and scorer is None:
        from mcvqa.model import check_adapter_folder

        check_adapter_folder(adapter)  # a full-model folder passed as --adapter is refused before anything loads
    ds = dataset if dataset is not None else read_csv(data, cfg=cfg.data)
    dist = distributed()
    out.mkdir(parents=True, exist_ok=True)
    journal_path = out / (JOURNAL if dist.world == 1 else f"journal.rank{dist.rank}-of-{dist.world}.jsonl")
    if journal_path.exists() and not resume:
        raise McvqaError(f"{out} holds an unfinished run ({journal_path.name}); pass --resume to continue it or use another --out")
    t0 = time.perf_counter()
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
    journal = Journal(journal_path, fp)
    if resume and not journal_path.exists():
        finished = Journal(journal_path.with_name(journal_path.name + ".done"), fp)
        if finished.path.exists() and (out / "submission.csv").exists():
            finished.load()  # refuses a finished run of other settings
            log(f"{out}: this run is already finished ({out / 'submission.csv'}); nothing to resume")
            summary = json.loads((out / "predict_summary.json").read_text(encoding="utf-8")) if (out / "predict_summary.json").exists() else {}
            return PredictResult(out, out / "submission.csv", out / "probs.csv", len(ds), float(summary.get("seconds", 0.0)), ScoreStats(), 0)
        log(f"no unfinished run in {out} to resume; starting fresh")
    done = journal.load() if resume else {}
    t_load = time.perf_counter()
    scorer = scorer or build_scorer(cfg, adapter)
    load_seconds = time.perf_counter() - t_load
    journal.start()  # after loading: a model that fails to load leaves no journal to trip over
    stats = ScoreStats()
    if done:
        log(f"resuming: {sum(len(r['ids']) for r in done.values())} of {len(ds)} questions already scored")
    tta_result = None
    if cfg.tta.methods:
        from mcvqa.adapt import run_tta

        # Test-time methods score (and may adapt) across the whole set; they are not journaled batch by batch.
        tta_result = run_tta(scorer, ds.items, cfg.tta, cfg.predict.batch_size, progress)
        probs = tta_result.probs
    elif cfg.predict.scoring == "generate":
        probs = score_items_generate(scorer.model, scorer.encoder, ds.items, max_new_tokens=cfg.predict.max_new_tokens, progress=progress, stats=stats)
    else:
        probs = score_items(
            scorer, ds.items, cfg.predict.batch_size, num_workers=cfg.predict.num_workers, on_bad_image=cfg.predict.on_bad_image,
            progress=progress, journal=journal, done=done, source=ds.source, stats=stats, sort_by_length=cfg.predict.sort_by_length,
            dist=dist,
        )
    seconds = time.perf_counter() - t0
    ids = [it.id for it in ds]
    sub, pr = out / "submission.csv", out / "probs.csv"
    if not dist.main:  # rank 0 writes the one submission; the others only close their journals
        dist.barrier()
        journal_path.replace(journal_path.with_name(journal_path.name + ".done"))
        return PredictResult(out, sub, pr, len(ds), seconds, stats, len(done))
    # Every output is staged and renamed into place together: a full disk leaves none of them, and the journal
    # stays, so `--resume` writes them once there is space (the scoring is not repeated).
    staged = Staged()
    try:
        sub, pr = write_outputs(out, ids, probs, staged)
        staged.text(out / "config.yaml", cfg.to_yaml())
        if stats.bad_images:
            staged.csv(out / "bad_images.csv", pd.DataFrame(stats.bad_images, columns=["id", "problem"]))
        if tta_result is not None and tta_result.per_order is not None:
            write_per_order(out / "per_order.csv", ids, tta_result.per_order, staged)
        _stage_summary(staged, out, cfg, ds, seconds, load_seconds, stats, adapter, done, tta_result)
    except BaseException:
        staged.discard()
        raise
    staged.commit()
    # The run is complete and its outputs are on disk: the journal has done its job.
    journal_path.replace(journal_path.with_name(journal_path.name + ".done"))
    dist.barrier()
    if stats.oom_halvings:
        log(f"GPU memory ran out {stats.oom_halvings} time(s); continued with batch size {stats.batch_size_used}")
    if stats.bad_images:
        log(f"{len(stats.bad_images)} image(s) could not be read and were answered with a blank image; see {out / 'bad_images.csv'}")
    if cfg.predict.scoring == "generate" and stats.generate_unparsed:
        log(f"generate: {stats.generate_unparsed} answer(s) had no parseable letter; used the first-step letter scores")
    return PredictResult(out, sub, pr, len(ds), seconds, stats, len(done))
