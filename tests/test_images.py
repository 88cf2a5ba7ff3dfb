"""Image loading: modes, orientation, letterbox/native geometry and refusal of hostile files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcvqa.config import ImageConfig
from mcvqa.errors import ImageError
from mcvqa.images import letterbox, load_image, native_size, prepare, visual_tokens


def test_letterbox_keeps_aspect_and_pads() -> None:
    img = Image.new("RGB", (720, 540), (255, 0, 0))
    out = letterbox(img, 512, (0, 0, 0))
    assert out.size == (512, 512)
    arr = np.asarray(out)
    # 720x540 -> 512x384 centred: 64 rows of padding above and below
    assert (arr[:64] == 0).all() and (arr[-64:] == 0).all()
    assert (arr[64:448, :, 0] > 250).all()
    assert visual_tokens(out) == 256


def test_native_keeps_shape_within_budget() -> None:
    w, h = native_size(540, 720, max_pixels=720 * 540, min_pixels=1024)
    assert w % 32 == 0 and h % 32 == 0 and w * h <= 720 * 540
    assert abs(w / h - 540 / 720) < 0.05
    assert native_size(4000, 3000, max_pixels=720 * 540, min_pixels=1024)[0] * native_size(4000, 3000, 720 * 540, 1024)[1] <= 720 * 540
    assert native_size(10, 10, max_pixels=720 * 540, min_pixels=64 * 64) == (64, 64)
    out = prepare(Image.new("RGB", (540, 720)), ImageConfig(mode="native"))
    assert 350 <= visual_tokens(out) <= 400  # ~380 tokens, as the field notes say


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (40, 30), (255, 0, 0, 0)),
        lambda: Image.new("LA", (40, 30), (10, 128)),
        lambda: Image.new("P", (40, 30), 3),
        lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
        lambda: Image.new("L", (40, 30), 77),
        lambda: Image.new("1", (40, 30), 1),
        lambda: Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)),
    ],
    ids=["RGBA", "LA", "P", "CMYK", "L", "1bit", "16bit"],
)
def test_every_mode_becomes_rgb(tmp_path: Path, make) -> None:
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG" if img.mode != "CMYK" else "TIFF"
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_range(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "w.png")
    assert load_image(tmp_path / "w.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 60)


def test_refuses_decompression_bomb(tmp_path: Path) -> None:
    Image.new("L", (9000, 9000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="81,000,000 pixels exceeds the 64,000,000-pixel limit"):
        load_image(tmp_path / "big.png")


@pytest.mark.parametrize(
    "content,message",
    [(b"", "empty file"), (b"hello, I am text", "not an image file"), (None, "file not found")],
    ids=["zero-byte", "text-as-png", "missing"],
)
def test_bad_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    Image.effect_noise((200, 200), 50).convert("RGB").save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt image data"):
        load_image(tmp_path / "cut.jpg")


def test_one_pixel_image_is_usable(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "p.png")
    out = prepare(load_image(tmp_path / "p.png"), ImageConfig(size=64))
    assert out.size == (64, 64)
