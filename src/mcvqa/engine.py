"""The batch engine: every path that scores questions goes through here.

One place for what each scored batch needs, whatever scores it (plain logits, generate, every test-time
method, training-time validation, serve): a journal that makes a killed run resumable (fsync'd before the next
batch starts; a batch counts as done only once it is on disk), out-of-memory halving, the bad-image policy,
sharding under ``accelerate launch`` / ``torchrun`` with the results gathered on every process, and a progress bar
that counts questions.

One loop, :meth:`Engine.map`, gives those guarantees to any function from a batch of questions to probabilities:
plain scoring (:meth:`Engine.score`, images decoded in DataLoader workers, batches of similar length), generate,
each test-time method phase by phase, training-time validation (:func:`score_items`) and ``serve``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcvqa.data import Item
from mcvqa.errors import DataError, McvqaError
from mcvqa.features import Batch, Collator, Encoder, ItemDataset, Loaded, resolve_num_workers, token_lengths
from mcvqa.io import disk_error, disk_problem
from mcvqa.runtime import Dist, progress_bar
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


# ------------------------------------------------------------------------------------------ the engine


@dataclass
class ScoreStats:
    batch_size_used: int = 0
    oom_halvings: int = 0
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    generate_unparsed: int = 0
    first_batch_seconds: float | None = None
    """From the first ``map`` call to its first batch's result on the host: worker start, decoding, kernel warm-up."""


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _halves(work: Any) -> list[Any]:
    """A batch of questions (a list of items, or an encoded :class:`Batch`) cut in two."""
    half = len(work) // 2
    if isinstance(work, Batch):
        return [work.rows(0, half), work.rows(half, len(work))]
    return [work[:half], work[half:]]


class _Prepared(torch.utils.data.Dataset):
    """Items through a picklable ``prepare`` (e.g. tokenise and decode), run in DataLoader workers."""

    def __init__(self, items: Sequence[Item], prepare: Callable[[Item], Any]) -> None:
        self.items, self.prepare = items, prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.prepare(self.items[i])


def _as_list(xs: list[Any]) -> list[Any]:
    return xs


def iterate_prepared(items: Sequence[Item], batches: Sequence[Sequence[int]], prepare: Callable[[Item], Any], num_workers: int = 0) -> Iterator[list[Any]]:
    """Lists of ``prepare(item)`` in the given batch order, made in ``num_workers`` processes ahead of use; the workers
    start at once, as :func:`iterate_batches`' do."""
    if not batches:
        return iter(())  # nothing left to make: no workers to start
    loader = torch.utils.data.DataLoader(
        _Prepared(items, prepare), batch_sampler=[list(b) for b in batches], collate_fn=_as_list,
        num_workers=resolve_num_workers(num_workers), persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)


def iterate_batches(
    items: Sequence[Item],
    encoder: Encoder,
    batches: Sequence[Sequence[int]],
    *,
    with_prefix: bool,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Batches in the given order; images decoded in ``num_workers`` processes, overlapped with scoring. The workers
    start at once, not at the first ``next`` (see :meth:`Engine.start`)."""
    if not batches:
        return iter(())  # nothing left to make (a resumed phase, a rank without batches): no workers to start
    ds = ItemDataset(items, encoder, on_bad_image="skip")  # the engine decides whether a bad image is fatal
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=[list(b) for b in batches],
        collate_fn=Collator(encoder, with_prefix=with_prefix),
        num_workers=resolve_num_workers(num_workers),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),  # leave the global RNG alone (see train.py)
    )
    return iter(loader)


def score_items_generate(model: Any, encoder: Encoder, questions: Sequence[Loaded], *, max_new_tokens: int, stats: ScoreStats) -> np.ndarray:
    """The reference's method, kept for comparison: one ``generate`` per question, parse the letter. The engine
    runs it batch by batch (a batch here is a group of questions journaled together, each generated alone)."""
    probs = np.zeros((len(questions), 4))
    for i, q in enumerate(questions):
        ex = encoder.encode(q.item, image=q.image)
        batch = encoder.collate([ex], with_prefix=True)
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

    probs: np.ndarray | torch.Tensor
    """(B, 4) probabilities by original option; a tensor may still be on the GPU (see :meth:`on_host`)."""
    per_order: np.ndarray | torch.Tensor | None = None
    """(B, V, 4) probabilities under each option order, when the method scores several (a tensor: as ``probs``)."""
    ready: Any = None
    """A CUDA event recorded after the copy of ``probs`` to the host was queued (see :meth:`copy_to_host`)."""

    def copy_to_host(self) -> Scored:
        """Queue the copy of GPU ``probs`` into pinned host memory and return at once: the engine reads it (in
        :meth:`on_host`) only after queueing the next batch, so the GPU never idles while the host journals this
        batch and prepares the next."""
        def pinned(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or not t.is_cuda:
                return t
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t.detach(), non_blocking=True)

        if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in (self.probs, self.per_order)):
            return self
        probs, per_order = pinned(self.probs), pinned(self.per_order)
        event = torch.cuda.Event()
        event.record()
        return Scored(probs, per_order, event)

    def on_host(self) -> Scored:
        """This result as float64 numpy arrays (waiting for its copy, if one is in flight)."""
        if self.ready is not None:
            self.ready.synchronize()

        def array(t: Any) -> Any:
            return t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else t

        return Scored(array(self.probs), array(self.per_order))


@dataclass
class Engine:
    """Scores questions batch by batch with the guarantees every path shares.

    ``map(phase, indices, fn)`` calls ``fn`` on consecutive batches of ``items[indices]``: a list of
    :class:`~mcvqa.features.Loaded` questions (images decoded; with ``raw`` also before letterboxing, for views); with
    ``encode=True`` a :class:`~mcvqa.features.Batch` (decoded and tokenised); with ``prepare`` (a picklable function
    of one item, e.g. encoding under every option order) the list of its results. Whichever it is, it is made in
    DataLoader workers while the previous batch runs, and methods never load an image themselves. For every batch it:

    * journals the result (phase, batch) before the next batch starts, so a killed run resumes where it stopped
      and, for a method that is a function of each batch alone, ends byte-identical; batches already in the
      journal are not scored again;
    * halves the batch on GPU out-of-memory and carries on (counted in ``stats``);
    * applies the bad-image policy: an image that cannot be read stops the run naming its row (``fail``), or is
      replaced by a blank image and listed (``skip``);
    * under several processes, process r takes batches r, r + world, ...; every process gets the whole result;
    * counts questions on one progress bar.

    With ``sort_by_length`` the batches hold questions of similar token length (less padding); the order is a
    pure function of the data, so a resumed run forms exactly the same batches.
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
    num_workers: int = 0
    _started: tuple[tuple[Any, ...], list[list[int]], list[list[int]], Iterator[Batch]] | None = field(default=None, repr=False)

    def start(
        self, phase: str = "", indices: Sequence[int] | None = None, *, with_prefix: bool = False, sort_by_length: bool = True,
        prepare: Callable[[Item], Any] | None = None, laps: dict[str, float] | None = None,
    ) -> None:
        """Start making the batches a later pass will ask for, before there is a model to run them: ``predict`` calls
        this once the processor is loaded, so the loader's workers decode, encode and pin the first batches while the
        weights load. Without ``prepare``, the encoded batches of :meth:`score` (of every item by default); with it
        (a function of one item that compares equal to the one the pass will pass, e.g. encoding under every option
        order), the lists of its results that :meth:`map` with that ``prepare`` makes. :meth:`map` takes them only
        when it asks for exactly these batches (same phase, questions, order, encoder and ``prepare``, and the same
        batches left to do); otherwise, or on :meth:`stop`, the workers are shut down. ``laps``, when given, receives
        the seconds of the batches' order (``early_order``) and of the workers' start (``early_workers``)."""
        t = time.perf_counter()
        indices = list(range(len(self.items)) if indices is None else indices)
        key = self._key(phase, indices, self.batch_size, sort_by_length, with_prefix, "encode" if prepare is None else prepare)
        slices = self._slices(indices, self.batch_size, sort_by_length)
        chosen = [slices[b] for b in self._todo(phase, slices, {})]
        t_order = time.perf_counter()
        works = (iterate_batches(self.items, self.encoder, chosen, with_prefix=with_prefix, num_workers=self.num_workers) if prepare is None
                 else iterate_prepared(self.items, chosen, prepare, self.num_workers))
        self._started = (key, slices, chosen, works)
        if laps is not None:
            laps |= {"early_order": round(t_order - t, 3), "early_workers": round(time.perf_counter() - t_order, 3)}

    def stop(self) -> None:
        """Shut down the workers :meth:`start` began, if :meth:`map` has not taken them."""
        self._started = None  # the loader's iterator, no longer referenced, shuts its workers down

    def _key(self, phase: str, indices: Sequence[int], batch_size: int, sort_by_length: bool, with_prefix: bool, made: Any) -> tuple[Any, ...]:
        return (phase, tuple(indices), batch_size, sort_by_length, with_prefix, made, self.encoder, self.num_workers)

    def _todo(self, phase: str, slices: list[list[int]], results: dict[int, Any]) -> list[int]:
        """This process's batches not already in the journal (``results`` receives those that are)."""
        mine = [b for b in range(len(slices)) if b % self.dist.world == self.dist.rank]
        for b in mine:
            rec = self.done.get((phase, b))
            if rec is not None and rec["ids"] == [self.items[i].id for i in slices[b]]:
                results[b] = (slices[b], rec["probs"], rec.get("per_order"), rec.get("bad", []))
        return [b for b in mine if b not in results]

    def map(
        self, phase: str, indices: Sequence[int], fn: Callable[[Any], Scored], desc: str = "", batch_size: int | None = None,
        *, encode: bool = False, with_prefix: bool = False, sort_by_length: bool = False, leave: bool = False,
        prepare: Callable[[Item], Any] | None = None, raw: bool = False,
    ) -> Scored:
        t_pass = time.perf_counter()
        indices = list(indices)
        bs = batch_size or self.batch_size
        early, self._started = self._started, None
        made = "encode" if encode else prepare  # the default loading (a fresh partial) is never started early
        if not (early is not None and made is not None and early[0] == self._key(phase, indices, bs, sort_by_length, with_prefix, made)):
            early = None  # dropped here: its workers stop
        slices = early[1] if early is not None else self._slices(indices, bs, sort_by_length)
        results: dict[int, tuple[list[int], list[list[float]], Any, list[Any]]] = {}
        todo = self._todo(phase, slices, results)
        total = sum(len(slices[b]) for b in range(len(slices)) if b % self.dist.world == self.dist.rank)
        chosen = [slices[b] for b in todo]
        if early is not None and early[2] != chosen:
            early = None  # the journal or the sharding changed since: those batches are not these
        works: Iterator[Any]
        if early is not None:
            works = early[3]
        elif encode:
            works = iterate_batches(self.items, self.encoder, chosen, with_prefix=with_prefix, num_workers=self.num_workers)
        else:
            load = prepare or functools.partial(self.encoder.load, raw=raw)
            works = iterate_prepared(self.items, chosen, load, self.num_workers)
        with progress_bar(total=total, initial=total - sum(len(slices[b]) for b in todo), desc=desc or phase, unit="q",
                          disable=not self.progress or not self.dist.main, leave=leave) as bar:

            def record(b: int, out: Scored, bad: list[list[str]]) -> None:
                out = out.on_host()
                if self.stats.first_batch_seconds is None:  # from the pass's start: a loader of its own starts in it
                    self.stats.first_batch_seconds = round(time.perf_counter() - t_pass, 3)
                p = out.probs / out.probs.sum(axis=1, keepdims=True)
                po = None if out.per_order is None else out.per_order.tolist()
                results[b] = (slices[b], p.tolist(), po, bad)
                if self.journal is not None:
                    ids = [self.items[i].id for i in slices[b]]
                    self.journal.append({"phase": phase, "batch": b, "ids": ids, "probs": p.tolist(), "per_order": po, "bad": bad})
                bar.update(len(slices[b]))

            # A batch is recorded once the next one is queued on the GPU (its copy back overlaps that batch); when the
            # next one fails, the one before is recorded first, so no finished work is lost.
            pending: tuple[int, Scored, list[list[str]]] | None = None
            try:
                for b, work in zip(todo, works):
                    out, bad = self._scored(fn, work)
                    if pending is not None:
                        record(*pending)
                    pending = (b, out.copy_to_host(), bad)
            finally:
                if pending is not None:
                    record(*pending)
                # A failure's traceback keeps this frame while the caller holds it (a notebook, demo's one process):
                # the loader's iterator must not live on with it, or its workers would.
                works, early = iter(()), None  # noqa: F841
        return self._assemble(indices, results)

    def score(
        self, scorer: Scorer, indices: Sequence[int] | None = None, *, sort_by_length: bool = True, desc: str = "scoring",
        phase: str = "", step: Callable[[Batch], Scored] | None = None,
    ) -> Scored:
        """Plain scoring (of every item, or of ``indices``): one forward per encoded batch, the letters' softmax at
        the answer position; ``step`` replaces :func:`logits_step` (e.g. the same with the adapter switched off)."""
        idx = range(len(self.items)) if indices is None else indices
        return self.map(phase, idx, step or logits_step(scorer), desc, encode=True, with_prefix=scorer.with_prefix_in_batch,
                        sort_by_length=sort_by_length, leave=indices is None)

    def _slices(self, indices: list[int], bs: int, sort_by_length: bool) -> list[list[int]]:
        if sort_by_length and len(indices) > bs:
            lengths = token_lengths([self.items[i] for i in indices], self.encoder)
            indices = [indices[k] for k in sorted(range(len(indices)), key=lambda k: (lengths[k], indices[k]))]
        return [indices[s : s + bs] for s in range(0, len(indices), bs)]

    def _assemble(self, indices: list[int], results: dict[int, tuple[list[int], list[list[float]], Any, list[Any]]]) -> Scored:
        """Every process's batches (gathered under several processes) into one result in ``indices`` order."""
        row = {j: k for k, j in enumerate(indices)}
        probs = np.zeros((len(indices), 4))
        per_order: np.ndarray | None = None
        for part in [results] if self.dist.world == 1 else self.dist.gather(results):
            for idx, p, po, bad in part.values():
                rows = [row[j] for j in idx]
                probs[rows] = np.asarray(p, dtype=np.float64)
                if po is not None:
                    arr = np.asarray(po, dtype=np.float64)
                    if per_order is None:
                        per_order = np.zeros((len(indices), arr.shape[1], 4))
                    per_order[rows] = arr
                for rid, why in bad:
                    if (rid, why) not in self.stats.bad_images:
                        self.stats.bad_images.append((rid, why))
        return Scored(probs, per_order)

    def _scored(self, fn: Callable[[Any], Scored], work: Any) -> tuple[Scored, list[list[str]]]:
        """``fn`` on one batch under the bad-image policy; returns its result and the images replaced. Whatever
        the mode, the images were loaded before ``fn`` runs, a blank standing in for an unreadable one."""
        if isinstance(work, Batch):
            bad = [(i, why) for i, why in zip(work.ids, work.bad_images) if why]
        else:  # encoded under orders, or loaded questions: each says which image it replaced
            bad = [(x.id, x.bad_image) for x in work if x.bad_image]
        if bad and self.on_bad_image == "fail":
            raise self._bad_image(*bad[0])
        return self._with_backoff(fn, work), [list(x) for x in dict.fromkeys(bad)]

    def _with_backoff(self, fn: Callable[[Any], Scored], work: Any) -> Scored:
        """``fn(work)``; on GPU out-of-memory, the two halves one after the other (and remember the size that fit)."""
        st = self.stats
        try:
            out = fn(work)
            st.batch_size_used = max(st.batch_size_used, len(work)) if st.oom_halvings == 0 else st.batch_size_used
            return out
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or len(work) == 1:
                raise
        # Outside the except block: the failed attempt's tensors are released before the halves run.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        st.oom_halvings += 1
        half = len(work) // 2
        st.batch_size_used = half if st.batch_size_used == 0 else min(st.batch_size_used, half)
        outs = [self._with_backoff(fn, w).on_host() for w in _halves(work)]
        per_order = None if outs[0].per_order is None else np.concatenate([o.per_order for o in outs])  # type: ignore[misc]
        return Scored(np.concatenate([o.probs for o in outs]), per_order)

    def _bad_image(self, rid: str, why: str) -> DataError:
        row = next((it.row for it in self.items if it.id == rid), None)
        return DataError(
            self.source or "data", f"image of id {rid}: {why}", row=row, column="path",
            fix="fix the file, or pass --on-bad-image skip to answer it from the text with a blank image",
        )


def logits_step(scorer: Scorer) -> Callable[[Batch], Scored]:
    """One encoded batch -> its (B, 4) probabilities: the plain scoring step."""
    def step(batch: Batch) -> Scored:
        return Scored(scorer.logprobs(batch).exp())  # left on the GPU: the engine copies it back (Scored.copy_to_host)

    return step


def score_items(scorer: Scorer, items: Sequence[Item], batch_size: int, *, progress: bool = True, desc: str = "scoring", num_workers: int = 0) -> np.ndarray:
    """(N, 4) probabilities in item order, through an engine without a journal (training-time validation)."""
    return Engine(items, scorer.encoder, batch_size, progress=progress, num_workers=num_workers).score(scorer, desc=desc).probs
