"""The competition CSV: reading, encodings, validation messages, path safety, splits."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_image, write_csv
from mcvqa.config import DataConfig
from mcvqa.data import kfold_splits, read_csv, stratified_split, subsample
from mcvqa.errors import DataError

HEADER = "id,path,question,a,b,c,d,answer\n"
ROW = "train_0001,train/train_0001.jpg,이 사진에서 보이는 탈것은 무엇인가요?,세발 오토바이,오토바이,자동차,자전거,a\n"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    make_image(tmp_path / "train" / "train_0001.jpg")
    make_image(tmp_path / "train" / "train_0002.jpg")
    return tmp_path


def test_reads_the_field_notes_example(folder: Path) -> None:
    ds = read_csv(write_csv(folder / "train.csv", HEADER + ROW))
    (it,) = ds.items
    assert it.id == "train_0001"
    assert it.question == "이 사진에서 보이는 탈것은 무엇인가요?"
    assert it.options == ("세발 오토바이", "오토바이", "자동차", "자전거")
    assert it.answer == 0 and it.answer_letter == "a"
    assert it.image == (folder / "train" / "train_0001.jpg").resolve()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp949"])
def test_encodings(folder: Path, encoding: str) -> None:
    ds = read_csv(write_csv(folder / "train.csv", HEADER + ROW, encoding=encoding))
    assert ds.items[0].options[0] == "세발 오토바이"


def test_windows_line_endings_reordered_and_extra_columns(folder: Path) -> None:
    text = "answer,d,c,b,a,question,path,id,source\r\n" "a,자전거,자동차,오토바이,세발 오토바이,무엇인가요?,train/train_0001.jpg,train_0001,web\r\n"
    it = read_csv(write_csv(folder / "train.csv", text)).items[0]
    assert it.options == ("세발 오토바이", "오토바이", "자동차", "자전거") and it.answer == 0


def test_options_that_look_like_missing_values_stay_text(folder: Path) -> None:
    text = HEADER + "train_0001,train/train_0001.jpg,무엇인가요?,NA,None,null,NaN,b\n"
    assert read_csv(write_csv(folder / "t.csv", text)).items[0].options == ("NA", "None", "null", "NaN")


def test_unlabelled_test_csv(folder: Path) -> None:
    text = "id,path,question,a,b,c,d\n" + ",".join(ROW.strip().split(",")[:7]) + "\n"
    ds = read_csv(write_csv(folder / "test.csv", text))
    assert ds.items[0].answer is None and not ds.labelled


# (csv text, expected fragments of the one-line message)
BAD = {
    "missing column": ("id,path,question,a,b,c\n1,train/train_0001.jpg,q,a,b,c\n", ["train.csv", "missing column d"]),
    "duplicate id": (HEADER + ROW + ROW.replace("train_0001.jpg", "train_0002.jpg"), ["row 2", "column id", "duplicate id 'train_0001'"]),
    "empty question": (HEADER + "x1,train/train_0001.jpg,,a,b,c,d,a\n", ["row 1", "column question", "question is empty"]),
    "whitespace question": (HEADER + "x1,train/train_0001.jpg,   ,a,b,c,d,a\n", ["row 1", "question is empty"]),
    "empty option": (HEADER + "x1,train/train_0001.jpg,q,a,,c,d,a\n", ["row 1", "column b", "option b is empty"]),
    "answer not a-d": (HEADER + "x1,train/train_0001.jpg,q,a,b,c,d,e\n", ["row 1", "column answer", "'e' is not one of a, b, c, d"]),
    "missing image": (HEADER + "x1,train/nope.jpg,q,a,b,c,d,a\n", ["row 1", "column path", "nope.jpg not found"]),
    "dot-dot escape": (HEADER + "x1,../outside.jpg,q,a,b,c,d,a\n", ["row 1", "column path", "outside the data root"]),
    "absolute path": (HEADER + "x1,/etc/passwd,q,a,b,c,d,a\n", ["row 1", "column path", "is absolute"]),
    "no rows": (HEADER, ["has a header but no rows"]),
    "empty file": ("", ["is empty"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validation_messages(folder: Path, case: str) -> None:
    text, fragments = BAD[case]
    with pytest.raises(DataError) as e:
        read_csv(write_csv(folder / "train.csv", text), require_answer=True)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (case, msg)


def test_unreadable_image_named(folder: Path) -> None:
    (folder / "train" / "fake.jpg").write_text("not an image", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1, column path: image fake.jpg: not an image"):
        read_csv(write_csv(folder / "t.csv", HEADER + "x1,train/fake.jpg,q,a,b,c,d,a\n"))


def test_symlink_outside_root_refused(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = make_image(tmp_path_factory.mktemp("elsewhere") / "secret.jpg")
    os.symlink(outside, folder / "train" / "link.jpg")
    with pytest.raises(DataError, match="symlink that points outside the data root"):
        read_csv(write_csv(folder / "t.csv", HEADER + "x1,train/link.jpg,q,a,b,c,d,a\n"))


def test_data_root_from_environment(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = folder / "csvs"
    sub.mkdir()
    write_csv(sub / "train.csv", HEADER + "x1,../train/train_0001.jpg,q,a,b,c,d,a\n")
    with pytest.raises(DataError, match="outside the data root"):
        read_csv(sub / "train.csv")
    monkeypatch.setenv("MCVQA_DATA", str(folder))
    from mcvqa.config import load_config

    # The variable reaches the reader through the config (data.root), as every command builds it ...
    assert read_csv(sub / "train.csv", cfg=load_config().data).items[0].id == "x1"
    # ... and not around it: a config that sets no root from the environment keeps the CSV's folder.
    with pytest.raises(DataError, match="outside the data root"):
        read_csv(sub / "train.csv", cfg=load_config(env=False).data)
    # A relative --data that is not under the cwd is looked up under MCVQA_DATA.
    monkeypatch.chdir(folder.parent)
    assert read_csv("csvs/train.csv", cfg=load_config().data).source == (sub / "train.csv").resolve()


def test_mixed_encoding_refused(folder: Path) -> None:
    raw = (HEADER + ROW).encode("utf-8") + "x2,train/train_0002.jpg,무엇,가,나,다,라,b\n".encode("cp949")
    (folder / "m.csv").write_bytes(raw)
    with pytest.raises(DataError, match=r"mixes UTF-8 with another encoding \(line 3"):
        read_csv(folder / "m.csv")


def test_long_option_truncated_with_warning(folder: Path) -> None:
    text = HEADER + f"x1,train/train_0001.jpg,q,{'가' * 5000},b,c,d,a\n"
    with pytest.warns(UserWarning, match="row 1: option a has 5000 characters; truncated to 512"):
        ds = read_csv(write_csv(folder / "t.csv", text), cfg=DataConfig(max_option_chars=512))
    assert len(ds.items[0].options[0]) == 512


def _labelled(tmp_path: Path, n: int = 40):
    make_image(tmp_path / "i.jpg")
    rows = "".join(f"id{i},i.jpg,q{i},a,b,c,d,{'abcd'[i % 4]}\n" for i in range(n))
    return read_csv(write_csv(tmp_path / "train.csv", HEADER + rows), cfg=DataConfig(check_images="exists"))


def test_stratified_split_is_fixed_and_balanced(tmp_path: Path) -> None:
    ds = _labelled(tmp_path)
    tr, va = stratified_split(ds, 0.2, seed=7)
    tr2, va2 = stratified_split(ds, 0.2, seed=7)
    assert [it.id for it in va] == [it.id for it in va2]
    assert len(va) == 8 and len(tr) == 32
    assert Counter(it.answer for it in va) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert not {it.id for it in tr} & {it.id for it in va}


def test_kfold_partitions_every_row_once(tmp_path: Path) -> None:
    ds = _labelled(tmp_path)
    folds = kfold_splits(ds, 5, seed=1)
    seen = Counter(it.id for _, va in folds for it in va)
    assert set(seen.values()) == {1} and len(seen) == len(ds)
    for tr, va in folds:
        assert len(tr) + len(va) == len(ds)
        assert Counter(it.answer for it in va) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_subsample_stratified(tmp_path: Path) -> None:
    ds = _labelled(tmp_path)
    part = subsample(ds, 20, seed=0)
    assert len(part) == 20 and Counter(it.answer for it in part) == {0: 5, 1: 5, 2: 5, 3: 5}


def test_permuted_item_keeps_label_on_content(tmp_path: Path) -> None:
    it = _labelled(tmp_path).items[1]  # answer b
    p = it.permuted([3, 1, 0, 2])
    assert p.options[p.answer] == it.options[it.answer]
