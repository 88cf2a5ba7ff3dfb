"""The bad-input catalogue: every case through the real command line, with its exact one-line message.

A case either fails with exit code 2 and one `error:` line naming the file, row and column (and never a
traceback), or is accepted (and then the rows come out right).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image, run_cli as run

H = "id,path,question,a,b,c,d,answer\n"
T = "id,path,question,a,b,c,d\n"
OK_ROW = "q1,img/ok.jpg,무엇인가요?,가,나,다,라,a\n"



@pytest.fixture()
def root(tmp_path: Path) -> Path:
    make_image(tmp_path / "img" / "ok.jpg")
    (tmp_path / "img" / "text.png").write_text("I am not a PNG", encoding="utf-8")
    (tmp_path / "img" / "zero.jpg").write_bytes(b"")
    Image.new("L", (9000, 9000)).save(tmp_path / "img" / "bomb.png")
    Image.effect_noise((300, 300), 60).convert("RGB").save(tmp_path / "img" / "full.jpg", quality=95)
    data = (tmp_path / "img" / "full.jpg").read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(data[: len(data) // 3])
    return tmp_path


# name: (csv text or bytes, expected message after "error: ")
FAILS: dict[str, tuple[str | bytes, str]] = {
    "missing column": ("id,path,question,a,b,c\nq1,img/ok.jpg,q,a,b,c\n", "data.csv: missing column d; expected header id,path,question,a,b,c,d[,answer]"),
    "missing two columns": ("id,path,question,a,b\nq1,img/ok.jpg,q,a,b\n", "data.csv: missing columns c, d; expected header id,path,question,a,b,c,d[,answer]"),
    "duplicate column": ("id,path,question,a,b,c,d,d\nq1,img/ok.jpg,q,a,b,c,d,d\n", "data.csv: column 'd' appears twice in the header"),
    "duplicate id": (H + OK_ROW + OK_ROW, "data.csv row 2, column id: duplicate id 'q1' (first seen in row 1); ids must be unique"),
    "empty id": (H + ",img/ok.jpg,q,가,나,다,라,a\n", "data.csv row 1, column id: id is empty"),
    "empty question": (H + "q1,img/ok.jpg,,가,나,다,라,a\n", "data.csv row 1, column question: question is empty"),
    "whitespace-only question": (H + "q1,img/ok.jpg,  \t ,가,나,다,라,a\n", "data.csv row 1, column question: question is empty"),
    "empty option": (H + "q1,img/ok.jpg,q,가,,다,라,a\n", "data.csv row 1, column b: option b is empty"),
    "answer e": (H + "q1,img/ok.jpg,q,가,나,다,라,e\n", "data.csv row 1, column answer: answer 'e' is not one of a, b, c, d"),
    "answer 1": (H + "q1,img/ok.jpg,q,가,나,다,라,1\n", "data.csv row 1, column answer: answer '1' is not one of a, b, c, d"),
    "NaN answer": (H + "q1,img/ok.jpg,q,가,나,다,라,\n", "data.csv row 1, column answer: answer is empty; expected one of a, b, c, d"),
    "missing image": (H + "q1,img/none.jpg,q,가,나,다,라,a\n", "data.csv row 1, column path: image none.jpg not found ({root}/img/none.jpg); check the path"),
    "empty path": (H + "q1,,q,가,나,다,라,a\n", "data.csv row 1, column path: path is empty; give the image path relative to the CSV"),
    "dot-dot escape": (H + "q1,../x.jpg,q,가,나,다,라,a\n", "data.csv row 1, column path: path '../x.jpg' points outside the data root {root}; keep images inside the data folder (or set --data-root / MCVQA_DATA)"),
    "absolute path": (H + "q1,/etc/passwd,q,가,나,다,라,a\n", "data.csv row 1, column path: path '/etc/passwd' is absolute; use a path relative to the CSV's folder"),
    "windows absolute path": (H + "q1,C:\\x.jpg,q,가,나,다,라,a\n", "data.csv row 1, column path: path 'C:\\\\x.jpg' is absolute; use a path relative to the CSV's folder"),
    "png that is text": (H + "q1,img/text.png,q,가,나,다,라,a\n", "data.csv row 1, column path: image text.png: not an image file that can be read (wrong extension or corrupt header)"),
    "zero-byte image": (H + "q1,img/zero.jpg,q,가,나,다,라,a\n", "data.csv row 1, column path: image zero.jpg: empty file (0 bytes)"),
    "decompression bomb": (H + "q1,img/bomb.png,q,가,나,다,라,a\n", "data.csv row 1, column path: image bomb.png: 9000x9000 = 81,000,000 pixels exceeds the 64,000,000-pixel limit (decompression-bomb guard); raise image.max_image_pixels if the image is genuine"),
    "header only": (H, "data.csv: has a header but no rows"),
    "empty file": ("", "data.csv: is empty; expected a header line id,path,question,a,b,c,d[,answer]"),
    "unclosed quote": (H + 'q1,img/ok.jpg,"q,가,나,다,라,a\n', "data.csv: is not a valid CSV (EOF inside string starting at row 1); check quoting"),
    "not utf-8 nor cp949": (H.encode() + b"q1,img/ok.jpg,\xff\xfe\xfd,a,b,c,d,a\n", "data.csv: is neither UTF-8 nor CP949 (line 2); re-save the file as UTF-8"),
    "mixed encodings": ((H + OK_ROW).encode("utf-8") + "q2,img/ok.jpg,무엇,가,나,다,라,b\n".encode("cp949"), "data.csv: mixes UTF-8 with another encoding (line 3 is not UTF-8); re-save the whole file as UTF-8"),
    "no answer column for training": (T + "q1,img/ok.jpg,q,가,나,다,라\n", "data.csv: has no answer column; labels are needed here (train/validation/evaluation)"),
}


@pytest.mark.parametrize("case", list(FAILS))
def test_failing_inputs(root: Path, case: str, capsys) -> None:
    text, expected = FAILS[case]
    csv = root / "data.csv"
    csv.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    command = "train" if case == "no answer column for training" or "answer" in case else "predict"
    argv = [command, "--data", str(csv), "--out", str(root / "out"), "--model", str(root / "no-model")]
    code, out, err = run(argv, capsys)
    assert code == 2, (case, err)
    assert "Traceback" not in err + out
    # The file is named as the user typed it (here: the path given to --data).
    assert err.strip() == "error: " + expected.format(root=root.resolve()).replace("data.csv", str(csv), 1), case


def test_symlink_out_of_root(root: Path, tmp_path_factory, capsys) -> None:
    outside = make_image(tmp_path_factory.mktemp("outside") / "secret.jpg")
    os.symlink(outside, root / "img" / "link.jpg")
    (root / "data.csv").write_text(H + "q1,img/link.jpg,q,가,나,다,라,a\n", encoding="utf-8")
    code, _, err = run(["train", "--data", str(root / "data.csv"), "--out", str(root / "o")], capsys)
    assert code == 2 and "is a symlink that points outside the data root" in err and err.count("\n") == 1


def test_bad_recipe_yaml(root: Path, capsys) -> None:
    (root / "r.yaml").write_text("train:\n  lr: [1,\n", encoding="utf-8")
    code, _, err = run(["config", "--config", str(root / "r.yaml")], capsys)
    assert code == 2 and err.startswith("error: ") and "r.yaml line" in err and "not valid YAML" in err


def test_adapter_pickle_refused(root: Path, tiny_model: Path, capsys) -> None:
    bad = root / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04")
    (root / "t.csv").write_text(T + "q1,img/ok.jpg,q,가,나,다,라\n", encoding="utf-8")
    code, _, err = run(["predict", "--model", str(tiny_model), "--adapter", str(bad), "--data", str(root / "t.csv"), "--out", str(root / "o")], capsys)
    assert code == 2 and err.strip().endswith("adapter is a pickle (adapter_model.bin); mcvqa loads safetensors only")


def test_remote_code_refused(root: Path, capsys) -> None:
    ckpt = root / "custom"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "my_vlm", "auto_map": {"AutoModelForImageTextToText": "modeling_my.MyVLM", "AutoProcessor": "processing_my.MyProc"}}')
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "modeling_my.py").write_text("raise SystemExit('remote code ran!')\n")
    (root / "t.csv").write_text(T + "q1,img/ok.jpg,q,가,나,다,라\n", encoding="utf-8")
    code, out, err = run(["predict", "--model", str(ckpt), "--data", str(root / "t.csv"), "--out", str(root / "o")], capsys)
    assert code == 2 and "remote code ran" not in out + err
    # mcvqa's own guard speaks, before transformers is asked anything (its refusal reads differently).
    assert err == f"error: {ckpt}: the checkpoint ships its own model code (auto_map in config.json); mcvqa does not run it unless you set model.trust_remote_code=true\n"


def test_image_root_is_a_folder_not_a_string_prefix(tmp_path: Path, capsys) -> None:
    """'../data2/x.jpg' under root 'data' starts with the root's text but lies outside it."""
    make_image(tmp_path / "data2" / "x.jpg")
    make_image(tmp_path / "data" / "ok.jpg")
    (tmp_path / "data" / "t.csv").write_text(T + "q1,../data2/x.jpg,q,가,나,다,라\n", encoding="utf-8")
    code, _, err = run(["predict", "--data", str(tmp_path / "data" / "t.csv"), "--out", str(tmp_path / "o"), "--model", "x"], capsys)
    assert code == 2 and "points outside the data root" in err and "../data2/x.jpg" in err


# Inputs that must be accepted, with what must come out.
def _png16(path: Path) -> None:
    Image.fromarray(np.full((40, 30), 50000, dtype=np.uint16)).save(path)


def _cmyk(path: Path) -> None:
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(path, format="JPEG")


def _rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (60, 20), (0, 0, 200)).save(path, exif=exif)


def _one_pixel(path: Path) -> None:
    Image.new("RGB", (1, 1), (255, 255, 0)).save(path)


ACCEPTED = {
    "16-bit PNG": ("img/x16.png", _png16),
    "CMYK JPEG": ("img/cmyk.jpg", _cmyk),
    "EXIF-rotated photo": ("img/rot.jpg", _rotated),
    "1x1 image": ("img/one.png", _one_pixel),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_images_score(root: Path, tiny_model: Path, case: str, capsys) -> None:
    rel, make = ACCEPTED[case]
    make(root / rel)
    (root / "t.csv").write_text(T + f"q1,{rel},q,가,나,다,라\nq2,img/ok.jpg,q,가,나,다,라\n", encoding="utf-8")
    code, _, err = run(["predict", "--model", str(tiny_model), "--data", str(root / "t.csv"), "--out", str(root / "o"), "-q"], capsys)
    assert code == 0, err
    assert (root / "o" / "submission.csv").read_text().splitlines()[1].startswith("q1,")


def test_accepted_text_variants(root: Path, tiny_model: Path, capsys) -> None:
    """Reordered + extra columns, CRLF, BOM, an uppercase answer, a 5,000-character option (truncated, warned)."""
    text = "\ufeffanswer,d,c,b,a,question,path,id,note\r\nA,라,다,나," + "가" * 5000 + ",무엇?,img/ok.jpg,q1,x\r\nb,라,다,나,가,무엇?,img/ok.jpg,q2,y\r\n"
    (root / "train.csv").write_text(text, encoding="utf-8")
    code, _, err = run(["predict", "--model", str(tiny_model), "--data", str(root / "train.csv"), "--out", str(root / "o"), "-q"], capsys)
    assert code == 0, err
    assert f"warning: {root / 'train.csv'} row 1: option a has 5000 characters; truncated to 512" in err
    assert (root / "o" / "submission.csv").read_text().splitlines()[0] == "id,answer"
    assert [l.split(",")[0] for l in (root / "o" / "submission.csv").read_text().splitlines()[1:]] == ["q1", "q2"]


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_truncated_image_at_predict_time(root: Path, tiny_model: Path, policy: str, capsys) -> None:
    """The header check passes a truncated JPEG; decoding fails later. fail: one line; skip: answered and listed."""
    (root / "t.csv").write_text(T + "q1,img/ok.jpg,q,가,나,다,라\nq2,img/cut.jpg,q,가,나,다,라\n", encoding="utf-8")
    code, _, err = run(
        ["predict", "--model", str(tiny_model), "--data", str(root / "t.csv"), "--out", str(root / "o"), "-q", "--on-bad-image", policy],
        capsys,
    )
    if policy == "fail":
        assert code == 2
        assert err.strip().startswith(f"error: {root / 't.csv'} row 2, column path: image of id q2: truncated or corrupt image data")
        assert err.strip().endswith("fix the file, or pass --on-bad-image skip to answer it from the text with a blank image")
        assert not (root / "o" / "submission.csv").exists()
    else:
        assert code == 0, err
        assert "1 image(s) could not be read" in err
        bad = (root / "o" / "bad_images.csv").read_text().splitlines()
        assert bad[0] == "id,problem" and bad[1].startswith("q2,truncated or corrupt image data")
        assert len((root / "o" / "submission.csv").read_text().splitlines()) == 3


UNREADABLE = {
    # id: path in the CSV; every kind of image that cannot be read, each must follow --on-bad-image
    "head": "img/head.jpg",   # a JPEG cut after its first 300 bytes (an interrupted copy): the header check fails
    "cut": "img/cut.jpg",     # cut in the data: the header opens, decoding fails
    "zero": "img/zero.jpg",   # 0 bytes
    "text": "img/text.png",   # not an image at all
    "bomb": "img/bomb.png",   # decompression bomb
    "dir": "img/folder.jpg",  # a folder where a file should be
    "gone": "img/gone.jpg",   # missing
}


@pytest.fixture()
def unreadable_csv(root: Path) -> Path:
    (root / "img" / "head.jpg").write_bytes((root / "img" / "full.jpg").read_bytes()[:300])
    (root / "img" / "folder.jpg").mkdir()
    rows = "".join(f"{rid},{path},무엇인가요?,가,나,다,라\n" for rid, path in UNREADABLE.items())
    return (root / "t.csv").write_text(T + "ok,img/ok.jpg,무엇인가요?,가,나,다,라\n" + rows, encoding="utf-8") and root / "t.csv"


@pytest.mark.parametrize("tta", [[], ["--tta", "orders"]], ids=["plain", "orders"])
def test_every_unreadable_image_follows_the_skip_policy(root: Path, unreadable_csv: Path, tiny_model: Path, tta: list[str], capsys) -> None:
    """--on-bad-image skip: every kind of unreadable image is answered from its text and listed, whatever stage
    notices it (the CSV reader's header check or the decoder); plain scoring and option orders alike."""
    out = root / "o"
    code, _, err = run(["predict", "--model", str(tiny_model), "--data", str(unreadable_csv), "--out", str(out), "-q", "--on-bad-image", "skip", *tta], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    listed = {line.split(",", 1)[0] for line in (out / "bad_images.csv").read_text().splitlines()[1:]}
    assert listed == set(UNREADABLE)
    sub = (out / "submission.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in sub[1:]] == ["ok", *UNREADABLE] and all(line.split(",")[1] in "abcd" for line in sub[1:])
    assert "t.csv row 2, column path" in err and "answered from its text" in err, "the reader names the first unreadable row"


def test_an_unreadable_image_fails_by_default_naming_its_row(root: Path, unreadable_csv: Path, tiny_model: Path, capsys) -> None:
    code, _, err = run(["predict", "--model", str(tiny_model), "--data", str(unreadable_csv), "--out", str(root / "o"), "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {unreadable_csv} row 2, column path: image head.jpg:"), err
    assert not (root / "o").exists() or not (root / "o" / "submission.csv").exists()
