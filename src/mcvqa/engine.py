"""The batch engine: every path that scores questions goes through here.

One place for what each scored batch needs, whatever scores it (plain logits, generate, every test-time
method, training-time validation, serve): a journal that makes a killed run resumable (fsync'd before the next
batch starts; a batch counts as done only once it is on disk), out-of-memory halving, the bad-image policy,
sharding under ``accelerate launch`` / ``torchrun`` with the results gathered on every process, and a progress bar
that counts questions.

Two loops share those guarantees: :func:`score_items` (plain scoring, images decoded in DataLoader workers,
batches of similar length) and :class:`Engine` (test-time methods: any function from a batch of questions to
probabilities, run phase by phase).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mcvqa.data import Item
from mcvqa.errors import DataError, ImageError, McvqaError
from mcvqa.features import Batch, Collator, Encoder, ItemDataset, collate, resolve_num_workers, token_lengths
from mcvqa.io import disk_error, disk_problem
from mcvqa.runtime import Dist
from mcvqa.scoring import Scorer, score_generate

JOURNAL = "journal.jsonl"


# ------------------------------------------------------------------------------------------ journal


class Journal:
    """Append-only record of scored batches; the first line fingerprints the run so resume can't mix runs."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Completed batches by (phase, index). A torn last line (killed mid-write) is ignored."""
        if not self.path.exists():
            return {}
        done: dict[tuple[str, int], dict[str, Any]] = {}
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
            done[(str(rec.get("phase", "")), int(rec["batch"]))] = rec
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
    done: dict[tuple[str, int], dict[str, Any]] | None = None,
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
        rec = done.get(("", b))
        if rec is not None and rec["ids"] == [items[i].id for i in idx]:
            probs[idx] = np.asarray(rec["probs"], dtype=np.float64)
            stats.bad_images += [tuple(x) for x in rec.get("bad", [])]
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


def score_items_generate(model: Any, encoder: Encoder, items: Sequence[Item], *, max_new_tokens: int, stats: ScoreStats) -> np.ndarray:
    """The reference's method, kept for comparison: one ``generate`` per question, parse the letter. The engine
    runs it batch by batch (a batch here is a group of questions journaled together, each generated alone)."""
    probs = np.zeros((len(items), 4))
    for i, it in enumerate(items):
        ex = encoder.encode(it)
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


# ------------------------------------------------------------------------------------------ test-time methods


@dataclass
class Scored:
    """What a method returns for a batch of questions."""

    probs: np.ndarray
    """(B, 4) probabilities by original option."""
    per_order: np.ndarray | None = None
    """(B, V, 4) probabilities under each option order, when the method scores several."""


@dataclass
class Engine:
    """Runs a test-time method batch by batch with predict's guarantees.

    ``map(phase, indices, fn)`` calls ``fn(items)`` on consecutive batches of ``items[indices]``. Each result is
    journaled (phase, batch) before the next batch starts, so a killed run resumes where it stopped and, for a
    method that is a function of each batch alone, ends byte-identical; batches already in the journal are not
    scored again. Under several processes process r takes batches r, r + world, ...; every process gets the
    whole result. Images that cannot be read stop the run naming their row (``fail``), or are replaced by a
    blank image and listed (``skip``), through the encoder's ``on_bad_image``.
    """

    items: Sequence[Item]
    encoder: Encoder
    batch_size: int = 16
    journal: Journal | None = None
    done: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)
    on_bad_image: str = "fail"
    source: Path | None = None
    stats: ScoreStats = field(default_factory=ScoreStats)
    progress: bool = True

    def map(self, phase: str, indices: Sequence[int], fn: Callable[[list[Item]], Scored], desc: str = "", batch_size: int | None = None) -> Scored:
        bs = batch_size or self.batch_size
        indices = list(indices)
        slices = [indices[s : s + bs] for s in range(0, len(indices), bs)]
        row = {j: k for k, j in enumerate(indices)}
        probs = np.zeros((len(indices), 4))
        per_order: np.ndarray | None = None
        mine = [b for b in range(len(slices)) if b % self.dist.world == self.dist.rank]
        kept = {b: self.done[(phase, b)] for b in mine if (phase, b) in self.done and self.done[(phase, b)]["ids"] == [self.items[i].id for i in slices[b]]}
        results: dict[int, tuple[list[int], list[list[float]], Any, list[Any]]] = {}
        for b, rec in kept.items():
            results[b] = (slices[b], rec["probs"], rec.get("per_order"), rec.get("bad", []))
        total = sum(len(slices[b]) for b in mine)
        with tqdm(total=total, initial=sum(len(slices[b]) for b in kept), desc=desc or phase, unit="q",
                  disable=not self.progress or not self.dist.main, leave=False, dynamic_ncols=True) as bar:
            for b in mine:
                if b in kept:
                    continue
                batch = [self.items[i] for i in slices[b]]
                out, bad = self._scored(fn, batch)
                p = out.probs / out.probs.sum(axis=1, keepdims=True)
                po = None if out.per_order is None else out.per_order.tolist()
                results[b] = (slices[b], p.tolist(), po, bad)
                if self.journal is not None:
                    self.journal.append({"phase": phase, "batch": b, "ids": [it.id for it in batch], "probs": p.tolist(), "per_order": po, "bad": bad})
                bar.update(len(batch))
        parts = [results] if self.dist.world == 1 else self.dist.gather(results)
        for part in parts:
            for b, (idx, p, po, bad) in part.items():
                probs[[row[j] for j in idx]] = np.asarray(p, dtype=np.float64)
                if po is not None:
                    arr = np.asarray(po, dtype=np.float64)
                    if per_order is None:
                        per_order = np.zeros((len(indices), arr.shape[1], 4))
                    per_order[[row[j] for j in idx]] = arr
                for rid, why in bad:
                    if (rid, why) not in self.stats.bad_images:
                        self.stats.bad_images.append((rid, why))
        return Scored(probs, per_order)

    def _scored(self, fn: Callable[[list[Item]], Scored], batch: list[Item]) -> tuple[Scored, list[tuple[str, str]]]:
        """``fn`` on one batch under the bad-image policy; returns its result and the images replaced."""
        enc = self.encoder
        enc.on_bad_image, enc.substituted = self.on_bad_image, []
        try:
            out = fn(batch)
        except ImageError as e:
            bad_item = next((it for it in batch if str(it.image) == e.path), None)
            raise DataError(
                self.source or "data", f"image of id {bad_item.id if bad_item else '?'}: {e.problem}", row=bad_item.row if bad_item else None,
                column="path", fix="fix the file, or pass --on-bad-image skip to answer it from the text with a blank image",
            ) from None
        finally:
            enc.on_bad_image = "fail"
        bad = list(dict.fromkeys(enc.substituted))
        return out, [list(x) for x in bad]  # type: ignore[misc]
