"""Files as other tools and platforms write them (issue 28): Excel, LibreOffice, pandas, Windows and macOS. Each
variant of the competition CSV reads into exactly the questions of the clean file (so it scores exactly the same),
or is refused in one line that names the problem and the fix. One CLI run proves the end-to-end claim on the
variant that combines the most quirks: the same submission, byte for byte."""

from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_image, run_cli
from mcvqa.data import read_csv
from mcvqa.errors import DataError
from mcvqa.evaluate import read_labels, read_probs

HEADER = ["id", "path", "question", "a", "b", "c", "d", "answer"]
ROWS = [
    ["0001", "img/q1.png", "이 사진에서 보이는 탈것은 무엇인가요?", "세발 오토바이", "오토바이", "자동차", "자전거", "a"],
    ["0002", "img/q2.png", "사진 속 동물은?", "NA", "None", "#N/A", "TRUE", "b"],  # options that look like missing values
    ["1e5", "img/q3.png", "색깔은, 무엇인가요?", "빨강, 진한", '"파랑"', "초록", "노랑", "c"],  # a comma and quotes in cells
    ["007", "img/사진4.png", "몇 개인가요?", "1", "2.0", "3", "04", "d"],  # numbers as option text, a Korean file name
]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for i, (_, path, *_rest) in enumerate(ROWS):
        make_image(tmp_path / path, colour=(40 * i, 30, 200 - 40 * i), fmt="PNG")
    return tmp_path


def clean(rows=ROWS, header=HEADER) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def _with(rows, col: str, values) -> list[list[str]]:
    k = HEADER.index(col)
    return [[v if j == k else x for j, x in enumerate(r)] for r, v in zip(rows, values)]


def _sep(delim: str, rows=ROWS, header=HEADER, quote=csv.QUOTE_MINIMAL, end="\n") -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delim, quoting=quote, lineterminator=end).writerows([header, *rows])
    return buf.getvalue()


# name: (bytes of the file, what the tool is)
VARIANTS = {
    "Excel, CSV UTF-8 (BOM, CRLF)": lambda: ("\ufeff" + _sep(",", end="\r\n")).encode("utf-8"),
    "Excel in a comma-decimal locale (sep=; hint line, semicolons)": lambda: ("sep=;\r\n" + _sep(";", end="\r\n")).encode("utf-8"),
    "LibreOffice, semicolons, every cell quoted": lambda: _sep(";", quote=csv.QUOTE_ALL).encode("utf-8"),
    "Excel 'Unicode Text' (UTF-16 with BOM, tabs)": lambda: _sep("\t", end="\r\n").encode("utf-16"),
    "UTF-16LE without a byte-order mark (PowerShell redirect)": lambda: _sep("\t").encode("utf-16-le"),
    "pipes": lambda: _sep("|").encode("utf-8"),
    "Korean Windows (CP949)": lambda: clean().encode("cp949"),
    "classic Mac line endings (CR only)": lambda: clean().replace("\n", "\r").encode("utf-8"),
    "pandas to_csv with its index column": lambda: pd.DataFrame(ROWS, columns=HEADER).to_csv().encode("utf-8"),
    "header cells padded and capitalised": lambda: clean(header=[" ID", "Path ", " Question ", "A", "B", "C", "D", " Answer"]).encode("utf-8"),
    "Windows path separators": lambda: clean(_with(ROWS, "path", [r[1].replace("/", "\\") for r in ROWS])).encode("utf-8"),
    "paths in another letter case (a CSV made on Windows)": lambda: clean(_with(ROWS, "path", [r[1].upper() for r in ROWS])).encode("utf-8"),
    "text and file names decomposed (macOS NFD)": lambda: unicodedata.normalize("NFD", clean()).encode("utf-8"),
    "file names decomposed on disk (copied from a Mac), the CSV composed": lambda: clean().encode("utf-8"),
    "answers as A, b., (c), full-width Ｄ": lambda: clean(_with(ROWS, "answer", ["A", "b.", "(c)", "Ｄ"])).encode("utf-8"),
    "trailing empty columns and rows (a sheet's used range)": lambda: (
        _sep(",", rows=[r + ["", ""] for r in ROWS], header=HEADER + ["", ""]) + ",,,,,,,,,\n,,,,,,,,,\n").encode("utf-8"),
    "two files joined (header repeated), blank line between": lambda: (clean(ROWS[:2]) + "\n" + clean(ROWS[2:])).encode("utf-8"),
    "padding spaces around cells": lambda: clean([[f" {x} " for x in r] for r in ROWS]).encode("utf-8"),
}


def _questions(ds) -> list[tuple]:
    return [(it.id, it.image, it.question, it.options, it.answer) for it in ds.items]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_file_from_another_tool_reads_as_the_clean_file(folder: Path, variant: str) -> None:
    want = _questions(read_csv(_write(folder / "clean.csv", clean().encode("utf-8"))))
    data = VARIANTS[variant]()
    if "decomposed" in variant:  # the file on disk is named decomposed too, as macOS writes it
        (folder / "img" / "사진4.png").rename(folder / "img" / unicodedata.normalize("NFD", "사진4.png"))
    with pytest.warns(UserWarning) if any(w in variant for w in ("letter case", "empty columns", "joined", "on disk")) else _nothing():
        got = _questions(read_csv(_write(folder / "other.csv", data), require_answer=True))
    if "decomposed" in variant:
        want = [(i, p.parent / unicodedata.normalize("NFD", p.name) if "사진" in p.name else p, *rest) for i, p, *rest in want]
    assert got == want
    assert read_labels(folder / "other.csv") == {r[0]: "abcd".index(r[7]) for r in ROWS}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


REFUSED = {
    "an .xlsx workbook passed as the CSV": (b"PK\x03\x04" + b"\x00" * 40, "is a spreadsheet workbook (.xlsx / .xls), not a CSV", "save it as CSV UTF-8"),
    "a binary file": (b"id,path\n\x00\x01\x02\x03garbage\x00", "contains NUL bytes (line 2)", "re-save the file as CSV"),
    "an id Excel turned into scientific notation": (
        clean([["1.23457E+11", *ROWS[0][1:]]]).encode("utf-8"), "row 1, column id: id '1.23457E+11' is a number a spreadsheet rewrote",
        "formatted as text"),
    "answers as numbers 1-4": (clean(_with(ROWS[:1], "answer", ["1"])).encode("utf-8"), "row 1, column answer: answer '1' is not one of a, b, c, d", None),
    "a delimiter no tool uses": (_sep("#").encode("utf-8"), "the header is one column ('id#path#question#", "comma, semicolon, tab or pipe"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_be_read_is_refused_in_one_line(folder: Path, case: str, capsys) -> None:
    data, says, fix = REFUSED[case]
    _write(folder / "bad.csv", data)
    code, out, err = run_cli(["predict", "--data", str(folder / "bad.csv"), "--out", str(folder / "o"), "--model", str(folder / "no-model")], capsys)
    assert code == 2 and "Traceback" not in out + err and err.count("\n") == 1, err
    assert err.startswith(f"error: {folder / 'bad.csv'}") and says in err and (fix is None or fix in err), err
    assert not (folder / "o").exists()


def test_probabilities_with_decimal_commas_read_as_written(tmp_path: Path) -> None:
    """probs.csv opened and saved by Excel in a comma-decimal locale: semicolons, "0,25"."""
    (tmp_path / "p.csv").write_text("id;p_a;p_b;p_c;p_d\r\nq1;0,7;0,1;0,1;0,1\r\nq2;0,25;0,25;0,25;0,25\r\n", encoding="utf-8")
    df = read_probs(tmp_path / "p.csv")
    assert df["id"].tolist() == ["q1", "q2"] and df["p_a"].tolist() == pytest.approx([0.7, 0.25])


def test_the_quirkiest_file_scores_exactly_as_the_clean_one(folder: Path, tiny_model: Path, capsys) -> None:
    """Excel's UTF-16 tab export of a CSV made on Windows (backslashes, other letter case, CRLF, padded header, answers
    in capitals, trailing empty rows): `mcvqa predict` writes the clean file's submission byte for byte, ids as written."""
    rows = _with(_with(ROWS, "path", [r[1].upper().replace("/", "\\") for r in ROWS]), "answer", ["A", "B", "C", "D"])
    quirky = (_sep("\t", rows=rows, header=[f" {h.upper()} " for h in HEADER], end="\r\n") + "\t" * 7 + "\r\n").encode("utf-16")
    _write(folder / "clean.csv", clean().encode("utf-8"))
    _write(folder / "quirky.csv", quirky)
    outs = {}
    for name in ("clean", "quirky"):
        code, _, err = run_cli(["predict", "--model", str(tiny_model), "--data", str(folder / f"{name}.csv"), "--out", str(folder / name),
                                "--device", "cpu", "-q"], capsys)
        assert code == 0, err
        outs[name] = (folder / name / "submission.csv").read_bytes()
    assert outs["quirky"] == outs["clean"]
    assert [line.split(",")[0] for line in outs["clean"].decode().splitlines()[1:]] == ["0001", "0002", "1e5", "007"]
