"""The competition's CSV format: reading, validation, splits.

Format (see the README): ``id,path,question,a,b,c,d`` plus ``answer`` (a-d) when labelled. ``path`` is
relative to the CSV's folder and must stay inside the data root (default: that folder). Extra columns
are kept aside and ignored; column order does not matter.

Data knows files and text, never models or tokenizers.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from mcvqa.config import LETTERS, DataConfig, environment
from mcvqa.errors import DataError, ImageError

REQUIRED = ("id", "path", "question", "a", "b", "c", "d")
OPTION_COLUMNS = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Item:
    """One multiple-choice question."""

    id: str
    image: Path
    """Absolute, resolved path of the image (checked to lie inside the data root)."""
    question: str
    options: tuple[str, str, str, str]
    answer: int | None = None
    """Index 0-3 of the correct option, or None when unlabelled."""
    row: int = 0
    """1-based data row in the source CSV (header excluded), for messages."""

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]

    def permuted(self, order: Sequence[int]) -> Item:
        """Options re-ordered so that new option ``j`` is old option ``order[j]``; the label follows its content."""
        options = tuple(self.options[k] for k in order)
        answer = None if self.answer is None else list(order).index(self.answer)
        return replace(self, options=options, answer=answer)  # type: ignore[arg-type]


@dataclass
class Dataset:
    """Items of one CSV, in file order."""

    items: list[Item]
    source: Path
    root: Path
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    @property
    def labelled(self) -> bool:
        return bool(self.items) and all(it.answer is not None for it in self.items)

    def subset(self, indices: Sequence[int]) -> Dataset:
        return Dataset([self.items[i] for i in indices], self.source, self.root, list(self.warnings))


# --------------------------------------------------------------------------------------------- encoding


def decode_csv_bytes(raw: bytes, file: Path) -> tuple[str, str]:
    """Bytes -> text. UTF-8 (with or without BOM) first, UTF-16 when it carries a byte-order mark or looks like it,
    then CP949 (the usual Korean Windows encoding). A workbook or a binary file is refused in one line.

    A file whose lines mix the two (some rows pasted from another tool) is refused naming the first line
    that is not UTF-8, since any single decoding would silently garble some rows.
    """
    if raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise DataError(file, "is a spreadsheet workbook (.xlsx / .xls), not a CSV", fix="save it as CSV UTF-8 (File > Save As) and pass that")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    utf16 = _utf16(raw)
    if utf16 is not None:  # Excel's "Unicode Text", PowerShell's default: UTF-16 with (or without) a byte-order mark
        try:
            return raw.decode(utf16).lstrip("\ufeff"), utf16
        except UnicodeDecodeError:
            raise DataError(file, "looks like UTF-16 but does not decode as it", fix="re-save the file as UTF-8") from None
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(file, f"contains NUL bytes (line {line}): not a text CSV", fix="re-save the file as CSV (UTF-8)")
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        utf8_error = e
    lines = raw.split(b"\n")
    utf8_multibyte = any(_is_utf8_non_ascii(line) for line in lines)
    if utf8_multibyte:
        bad_line = raw[: utf8_error.start].count(b"\n") + 1
        raise DataError(
            file,
            f"mixes UTF-8 with another encoding (line {bad_line} is not UTF-8)",
            fix="re-save the whole file as UTF-8",
        )
    try:
        return raw.decode("cp949"), "cp949"
    except UnicodeDecodeError:
        bad_line = raw[: utf8_error.start].count(b"\n") + 1
        raise DataError(file, f"is neither UTF-8 nor CP949 (line {bad_line})", fix="re-save the file as UTF-8") from None


def _utf16(raw: bytes) -> str | None:
    """``utf-16`` when the bytes carry a UTF-16 byte-order mark, ``utf-16-le``/``-be`` when every other byte of an
    ASCII-heavy text is NUL (no mark), else None."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    head = raw[:4000]
    if len(head) >= 8 and len(head) % 2 == 0:
        even, odd = head[0::2], head[1::2]
        # ASCII characters (the header, ids, paths) put a NUL in every other byte; Hangul rarely does (U+AC00 once).
        if odd.count(0) > 0.25 * len(odd) and even.count(0) < 0.05 * len(even):
            return "utf-16-le"
        if even.count(0) > 0.25 * len(even) and odd.count(0) < 0.05 * len(odd):
            return "utf-16-be"
    return None


def _is_utf8_non_ascii(line: bytes) -> bool:
    if line.isascii():
        return False
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --------------------------------------------------------------------------------------------- reading


def resolve_root(csv_path: Path, root: str | Path | None) -> Path:
    """The data root: explicit flag or config (which ``MCVQA_DATA`` fills when unset), else the CSV's folder."""
    base = Path(root) if root is not None else csv_path.parent
    return base.expanduser().resolve()


def resolve_csv(path: str | Path) -> Path:
    """A CSV given relative to the cwd, or else relative to ``MCVQA_DATA``."""
    p = Path(path).expanduser()
    data = environment().data
    if not p.exists() and not p.is_absolute() and data:
        alt = Path(data).expanduser() / p
        if alt.exists():
            return alt
    return p


def safe_image_path(csv_path: Path, root: Path, rel: str, row: int) -> Path:
    """``rel`` resolved against the CSV's folder; refused if it leaves the data root (``..``, absolute, symlink)."""
    if not rel:
        raise DataError(csv_path, "path is empty", row=row, column="path", fix="give the image path relative to the CSV")
    if "\x00" in rel:
        raise DataError(csv_path, "path contains a NUL byte", row=row, column="path")
    candidate = Path(rel)
    if candidate.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(
            csv_path, f"path {rel!r} is absolute", row=row, column="path", fix="use a path relative to the CSV's folder"
        )
    full = (csv_path.parent / candidate.as_posix().replace("\\", "/")).resolve()
    if not full.is_relative_to(root):
        what = "is a symlink that points" if (csv_path.parent / candidate).is_symlink() else "points"
        raise DataError(
            csv_path,
            f"path {rel!r} {what} outside the data root {root}",
            row=row,
            column="path",
            fix="keep images inside the data folder (or set --data-root / MCVQA_DATA)",
        )
    return full


def read_csv(
    path: str | Path,
    *,
    root: str | Path | None = None,
    require_answer: bool = False,
    cfg: DataConfig | None = None,
    on_bad_image: str = "fail",
) -> Dataset:
    """Read and validate a competition CSV. Raises :class:`DataError` naming the file, row and column.

    ``on_bad_image``: ``fail`` refuses a row whose image is missing or unreadable (checked as ``data.check_images``
    says); ``skip`` (predict's ``--on-bad-image skip``) keeps the row with a warning naming it, and the scorer then
    answers it from its text with a blank image and lists it in ``bad_images.csv``. Paths that leave the data root
    are refused either way."""
    cfg = cfg or DataConfig()
    csv_path = resolve_csv(path)
    if not csv_path.exists():
        raise DataError(csv_path, "file not found", fix="check the path (or set MCVQA_DATA)")
    if csv_path.is_dir():
        raise DataError(csv_path, "is a folder, not a CSV file", fix="pass the CSV file, e.g. data/test.csv")
    root_path = resolve_root(csv_path, root if root is not None else cfg.root)
    # The CSV itself may live elsewhere (a run's val.csv, with paths like ../../data/train/x.jpg): what must stay
    # inside the root are its images, which safe_image_path checks one by one.
    table = read_table(csv_path, REQUIRED, "id,path,question,a,b,c,d[,answer]")
    df = table.frame
    has_answer = "answer" in df.columns
    if require_answer and not has_answer:
        raise DataError(csv_path, "has no answer column", fix="labels are needed here (train/validation/evaluation)")
    if len(df) == 0:
        raise DataError(csv_path, "has a header but no rows")
    items: list[Item] = []
    notes: list[str] = list(table.notes)
    seen: dict[str, int] = {}
    paths = _PathMatcher(root_path)
    for row, rec in zip(table.rows, df.to_dict("records")):
        items.append(_read_row(csv_path, root_path, row, rec, seen, notes, cfg, has_answer, require_answer, on_bad_image, paths))
    if paths.matched:
        row, typed, found = paths.matched[0]
        notes.append(f"{csv_path}: {len(paths.matched)} image path(s) name a file only up to letter case or Unicode normalisation "
                     f"(a CSV written on Windows or macOS), e.g. row {row}: {typed!r} is {found}; used as found")
    if has_answer and not require_answer:
        n_labelled = sum(it.answer is not None for it in items)
        if 0 < n_labelled < len(items):
            notes.append(f"{csv_path}: {len(items) - n_labelled} of {len(items)} rows have no answer")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Dataset(items, csv_path.resolve(), root_path, notes)


DELIMITERS = (",", ";", "\t", "|")
"""What spreadsheets write: commas; semicolons where the comma is the decimal mark (Excel in many locales); tabs
(Excel's "Unicode Text", copies from a sheet); pipes."""


@dataclass
class Table:
    """A CSV as text cells: headers stripped and lower-cased, every cell a string ("NA" stays "NA")."""

    frame: pd.DataFrame
    rows: list[int]
    """1-based data row of each frame row (header excluded), counted before empty rows were dropped."""
    delimiter: str
    notes: list[str] = field(default_factory=list)


def read_table(path: Path, expected: Sequence[str], header_hint: str | None = None) -> Table:
    """Any CSV as spreadsheets and scripts write it, read the same way: encoding detected (UTF-8 with or without BOM,
    CP949, UTF-16), Excel's ``sep=`` line honoured, the delimiter found from the header (the one that makes the
    ``expected`` columns appear), any line ending; rows with every cell empty and repeated header rows (files joined
    together) dropped, each said once. A header naming a column twice, or missing an ``expected`` one, is refused
    (``header_hint``: the header to suggest)."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, "is empty", fix=f"expected a header line {header_hint or ','.join(expected)}")
    text, _encoding = decode_csv_bytes(raw, path)
    text = text.lstrip("\ufeff")
    parts = re.split(r"(\r\n|\r|\n)", text, maxsplit=1)
    first, rest = parts[0], "".join(parts[2:]) if len(parts) > 2 else ""
    hint = re.fullmatch(r'\s*"?sep=(.)"?\s*,*', first)
    if hint:  # Excel's first-line hint: "sep=;"
        delimiter, text = hint.group(1), rest
        first = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    else:
        delimiter = _sniff(first, expected)
    header = [h.strip().lower() for h in next(csv.reader([first], delimiter=delimiter), [])]
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    if dupes:
        raise DataError(path, f"column {dupes[0]!r} appears twice in the header")
    missing = [c for c in expected if c not in header]
    if missing and len(header) == 1 and len(expected) > 1:
        shown = first if len(first) <= 40 else first[:40] + "..."
        raise DataError(path, f"the header is one column ({shown!r}): its delimiter is none of comma, semicolon, tab or pipe",
                        fix="save the file as CSV (comma-separated)")
    if missing:
        raise DataError(
            path, f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
            fix=f"expected header {header_hint or ','.join(expected)}",
        )
    try:
        df = pd.read_csv(
            io.StringIO(text), sep=delimiter, dtype=str,
            keep_default_na=False,  # an option reading "NA" or "None" is text, not a missing value
            na_filter=False, skipinitialspace=False, quoting=csv.QUOTE_MINIMAL, skip_blank_lines=False,
        )
    except pd.errors.ParserError as e:
        detail = str(e).strip().splitlines()[-1].removeprefix("Error tokenizing data. C error: ")
        raise DataError(path, f"is not a valid CSV ({detail})", fix="check quoting") from None
    except pd.errors.EmptyDataError:
        raise DataError(path, "has no header line", fix=f"expected {header_hint or ','.join(expected)}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    notes: list[str] = []
    rows = list(range(1, len(df) + 1))
    if len(df):
        cells = df.apply(lambda col: col.str.strip())
        empty = (cells == "").all(axis=1)
        repeated = cells[list(expected)].apply(lambda col: col.str.lower() == col.name).all(axis=1)
        for mask, what in ((empty, "empty row(s) (every cell blank)"), (repeated & ~empty, "repeated header row(s) (files joined together?)")):
            if mask.any():
                first_row = int(mask.values.argmax()) + 1
                notes.append(f"{path}: {int(mask.sum())} {what} skipped, the first at row {first_row}")
        keep = ~(empty | repeated)
        rows = [r for r, k in zip(rows, keep) if k]
        df = df[keep.values].reset_index(drop=True)
    return Table(df, rows, delimiter, notes)


def _sniff(header_line: str, expected: Sequence[str]) -> str:
    """The delimiter whose split of the header names every ``expected`` column (a comma when none does: the message
    about the missing column then shows what the header held)."""
    for d in DELIMITERS:
        cells = {c.strip().lower() for c in next(csv.reader([header_line], delimiter=d), [])}
        if all(e in cells for e in expected):
            return d
    return ","


def _read_row(
    csv_path: Path, root_path: Path, row: int, rec: dict[str, Any], seen: dict[str, int], notes: list[str],
    cfg: DataConfig, has_answer: bool, require_answer: bool, on_bad_image: str = "fail", paths: _PathMatcher | None = None,
) -> Item:
    """One validated question (1-based ``row``); too-long text truncated with a note."""
    rid = str(rec["id"]).strip()
    if not rid:
        raise DataError(csv_path, "id is empty", row=row, column="id")
    if SCIENTIFIC.fullmatch(rid):
        raise DataError(
            csv_path, f"id {rid!r} is a number a spreadsheet rewrote in scientific notation: the id itself is lost", row=row,
            column="id", fix="export the CSV again with the id column formatted as text (or from the original file)",
        )
    if rid in seen:
        raise DataError(csv_path, f"duplicate id {rid!r} (first seen in row {seen[rid]})", row=row, column="id", fix="ids must be unique")
    seen[rid] = row
    question = _clean_text(rec["question"])
    if not question:
        raise DataError(csv_path, "question is empty", row=row, column="question")
    if len(question) > cfg.max_question_chars:
        notes.append(f"{csv_path} row {row}: question has {len(question)} characters; truncated to {cfg.max_question_chars}")
        question = question[: cfg.max_question_chars]
    options = []
    for col in OPTION_COLUMNS:
        opt = _clean_text(rec[col])
        if not opt:
            raise DataError(csv_path, f"option {col} is empty", row=row, column=col)
        if len(opt) > cfg.max_option_chars:
            notes.append(f"{csv_path} row {row}: option {col} has {len(opt)} characters; truncated to {cfg.max_option_chars}")
            opt = opt[: cfg.max_option_chars]
        options.append(opt)
    answer: int | None = None
    if has_answer:
        try:
            answer = answer_index(rec["answer"])
        except ValueError:
            raise DataError(csv_path, f"answer {rec['answer']!r} is not one of a, b, c, d", row=row, column="answer") from None
        if answer is None and require_answer:
            raise DataError(csv_path, "answer is empty", row=row, column="answer", fix="expected one of a, b, c, d")
    typed = str(rec["path"]).strip()
    image = safe_image_path(csv_path, root_path, typed, row)
    if paths is not None and not image.exists():
        image = paths.find(image, row, typed) or image
    try:
        _check_image(csv_path, image, row, cfg)
    except DataError as e:
        if on_bad_image != "skip":
            raise
        notes.append(f"{e}; answered from its text with a blank image (--on-bad-image skip), listed in bad_images.csv")
    return Item(rid, image, question, tuple(options), answer, row)  # type: ignore[arg-type]


def _clean_text(value: object) -> str:
    """Strip, fold internal newlines/tabs to spaces so every option renders on one line, and compose Unicode (NFC):
    text a macOS tool wrote decomposed (Korean as separate jamo) then tokenizes like the same text typed anywhere."""
    text = "" if value is None else str(value)
    if not text.strip():
        return ""
    return unicodedata.normalize("NFC", " ".join(text.replace("\r", " ").replace("\n", " ").replace("\t", " ").split()))


SCIENTIFIC = re.compile(r"\d(\.\d+)?E\+\d+")
"""An id like ``1.23457E+11``: what a spreadsheet shows, and saves, for a long numeric id."""


def answer_index(value: object) -> int | None:
    """0-3 for an answer letter as tools write it (``a``, ``A``, ``b.``, ``(c)``, ``d)``, full-width ``Ｄ``); None for
    an empty cell; ValueError for anything else (a 1-4 answer column is not guessed at: 0- or 1-based?)."""
    text = unicodedata.normalize("NFKC", "" if value is None else str(value)).strip().lower()
    if text in ("", "nan", "none", "null"):
        return None
    text = text.strip("()[] ").rstrip(".):").strip()
    if text in LETTERS:
        return LETTERS.index(text)
    raise ValueError(text)


class _PathMatcher:
    """Finds the one file a path names up to letter case and Unicode normalisation (``Train/IMG_1.JPG`` for
    ``train/img_1.jpg``; a macOS file name stored decomposed): Windows and macOS make no difference between them, so a
    CSV written there names files that way. Only asked when the exact path does not exist; folder listings cached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listings: dict[Path, dict[str, list[str]]] = {}
        self.matched: list[tuple[int, str, Path]] = []

    def find(self, image: Path, row: int, typed: str) -> Path | None:
        try:
            parts = image.relative_to(self.root).parts
        except ValueError:
            return None
        cur = self.root
        for part in parts:
            names = self._listing(cur).get(_fold(part), [])
            if len(names) != 1:
                return None
            cur = cur / names[0]
        if not cur.resolve().is_relative_to(self.root):
            return None
        self.matched.append((row, typed, cur))
        return cur.resolve()

    def _listing(self, folder: Path) -> dict[str, list[str]]:
        if folder not in self.listings:
            listing: dict[str, list[str]] = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        listing.setdefault(_fold(entry.name), []).append(entry.name)
            except OSError:
                pass
            self.listings[folder] = listing
        return self.listings[folder]


def _fold(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def _check_image(csv_path: Path, image: Path, row: int, cfg: DataConfig) -> None:
    if not image.exists():
        raise DataError(csv_path, f"image {image.name} not found ({image})", row=row, column="path", fix="check the path")
    if cfg.check_images == "exists":
        return
    from mcvqa.images import load_image, open_image

    try:
        if cfg.check_images == "full":
            load_image(image)
        else:
            open_image(image).close()
    except ImageError as e:
        raise DataError(csv_path, f"image {image.name}: {e.problem}", row=row, column="path") from None


# --------------------------------------------------------------------------------------------- splits


def write_items(path: Path, items: Sequence[Item]) -> Path:
    """Labelled rows back in the competition's format (``id,path,question,a,b,c,d,answer``), image paths relative to
    ``path``'s folder: the held-out split beside a run, which ``evaluate``, ``report``, ``ensemble`` and ``predict`` read
    as they read ``train.csv`` (the images stay where they are: give their root as ``--data-root`` or MCVQA_DATA)."""
    from mcvqa.io import atomic_write_csv

    base = path.parent.resolve()
    rows = [{"id": it.id, "path": os.path.relpath(it.image, base).replace(os.sep, "/"), "question": it.question,
             **dict(zip(LETTERS, it.options)), "answer": it.answer_letter or ""} for it in items]
    return atomic_write_csv(path, pd.DataFrame(rows, columns=["id", "path", "question", *LETTERS, "answer"]))


def stratified_split(ds: Dataset, val_fraction: float = 0.2, seed: int = 42) -> tuple[Dataset, Dataset]:
    """Fixed, seeded train/validation split keeping the answer-letter proportions."""
    if not ds.labelled:
        raise DataError(ds.source, "a validation split needs every row labelled", column="answer")
    rng = random.Random(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for letter in range(4):
        idx = [i for i, it in enumerate(ds.items) if it.answer == letter]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return ds.subset(sorted(train_idx)), ds.subset(sorted(val_idx))


def kfold_splits(ds: Dataset, k: int, seed: int = 42) -> list[tuple[Dataset, Dataset]]:
    """Stratified K-fold: every labelled row is in exactly one validation fold."""
    if k < 2:
        raise ValueError("k must be at least 2")
    if not ds.labelled:
        raise DataError(ds.source, "K-fold needs every row labelled", column="answer")
    if len(ds) < k:
        raise DataError(ds.source, f"{len(ds)} rows cannot make {k} folds")
    rng = random.Random(seed)
    fold_of = [0] * len(ds)
    offset = 0
    for letter in range(4):
        idx = [i for i, it in enumerate(ds.items) if it.answer == letter]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            fold_of[i] = (j + offset) % k
        offset += len(idx)  # continue the round-robin so fold sizes stay balanced overall
    folds = []
    for f in range(k):
        val = [i for i in range(len(ds)) if fold_of[i] == f]
        train = [i for i in range(len(ds)) if fold_of[i] != f]
        folds.append((ds.subset(train), ds.subset(val)))
    return folds


def subsample(ds: Dataset, n: int, seed: int = 42) -> Dataset:
    """A stratified random subset of ``n`` rows (all rows when ``n`` >= len)."""
    if n >= len(ds):
        return ds
    if not ds.labelled:
        rng = random.Random(seed)
        return ds.subset(sorted(rng.sample(range(len(ds)), n)))
    frac = n / len(ds)
    _, part = stratified_split(ds, frac, seed)
    return part
