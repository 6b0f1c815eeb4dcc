"""dermray.data.imaging: every mode decodes to RGB correctly; every kind of broken file is an UnreadableImage."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dermray.data.imaging import ImageInfo, UnreadableImage, decode_rgb, probe_image, to_rgb

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("DERMRAY_TEST_DATA", REPO.parent / "shared" / "data"))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    # Noise keeps the JPEG's entropy-coded data large, so cutting it really removes image data.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def write(tmp_path: Path, name: str, data: bytes) -> bytes:
    # The tests make their own files on disk (as staging would read them) and read them back.
    path = tmp_path / name
    path.write_bytes(data)
    return path.read_bytes()


def uda1_jpeg() -> Path:
    folder = TEST_DATA / "isic-uda1-sample" / "images"
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not files:
        pytest.skip(f"real UDA-1 JPEGs not found under {folder} (set DERMRAY_TEST_DATA)")
    # The largest file is the full-resolution one draft mode matters for.
    return max(files, key=lambda p: p.stat().st_size)


def test_probe_reports_size_and_mode(tmp_path):
    data = write(tmp_path, "ok.jpg", encode(noisy_rgb(300, 200), "JPEG", quality=90))
    assert probe_image(data) == ImageInfo(width=300, height=200, mode="RGB")


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file_is_unreadable(tmp_path, fmt, suffix):
    whole = encode(noisy_rgb(256, 192), fmt)
    data = write(tmp_path, f"cut.{suffix}", whole[: len(whole) * 2 // 3])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(UnreadableImage, match="truncated"):
        probe_image(data)
    with pytest.raises(UnreadableImage, match="truncated"):
        decode_rgb(data, min_side=32)


def test_truncated_is_caught_even_if_another_library_allowed_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    whole = encode(noisy_rgb(256, 192), "JPEG")
    with pytest.raises(UnreadableImage, match="truncated"):
        probe_image(write(tmp_path, "cut.jpg", whole[: len(whole) // 2]))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_empty_and_text_bytes_are_unreadable(tmp_path):
    with pytest.raises(UnreadableImage, match="empty file"):
        probe_image(write(tmp_path, "empty.jpg", b""))
    text = write(tmp_path, "notes.jpg", b"this is a text file, not a picture\n" * 20)
    with pytest.raises(UnreadableImage, match="not an image"):
        probe_image(text)
    with pytest.raises(UnreadableImage, match="not an image"):
        decode_rgb(text)


def test_unreadable_image_carries_reason():
    with pytest.raises(UnreadableImage) as caught:
        decode_rgb(b"")
    assert caught.value.reason == "empty file"
    assert str(caught.value) == "empty file"


def test_grayscale_becomes_rgb(tmp_path):
    gray = Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8) % 200, "L")
    data = write(tmp_path, "gray.png", encode(gray, "PNG"))
    out = decode_rgb(data)
    assert out.mode == "RGB" and out.size == (64, 48)
    arr = np.asarray(out)
    assert np.array_equal(arr[..., 0], np.asarray(gray)) and np.array_equal(arr[..., 0], arr[..., 2])
    assert probe_image(data).mode == "L"


def test_transparent_pixels_become_white_not_black(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (200, 30, 40)
    rgba[:, :15, 3] = 0  # left half fully transparent
    rgba[:, 15:, 3] = 255
    out = np.asarray(decode_rgb(write(tmp_path, "alpha.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))))
    assert (out[:, :15] == 255).all()
    assert (out[:, 15:] == (200, 30, 40)).all()

    la = Image.fromarray(np.dstack([np.full((8, 8), 10, np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert (np.asarray(decode_rgb(write(tmp_path, "la.png", encode(la, "PNG")))) == 255).all()


def test_palette_with_transparency_becomes_white(tmp_path):
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 5, 10))
    data = write(tmp_path, "pal.png", encode(pal, "PNG", transparency=0))
    out = np.asarray(decode_rgb(data))
    assert (out[:, :5] == 255).all() and (out[:, 5:] == (255, 0, 0)).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    data = write(tmp_path, "cmyk.jpg", encode(cmyk, "JPEG", quality=95))
    assert probe_image(data).mode == "CMYK"
    out = decode_rgb(data, min_side=16)
    assert out.mode == "RGB" and out.size == (40, 30)
    r, g, b = np.asarray(out).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16)
    img16 = Image.fromarray(np.tile(ramp, (4, 1)))
    assert img16.mode == "I;16"
    data = write(tmp_path, "deep.png", encode(img16, "PNG"))
    out = np.asarray(decode_rgb(data))
    assert out.shape == (4, 256, 3)
    row = out[0, :, 0].astype(int)
    assert not (out == 255).all()
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 200
    # In-memory 16-bit variants too (Pillow opens some files in these modes).
    for mode in ("I;16", "I;16B"):
        img = Image.frombytes(mode, (256, 1), ramp.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        assert np.array_equal(np.asarray(to_rgb(img))[0, :, 0], (ramp >> 8).astype(np.uint8))


def test_thirty_two_bit_gray_is_scaled():
    ramp = np.linspace(0, 65535, 100).astype(np.int32).reshape(1, 100)
    out = np.asarray(to_rgb(Image.fromarray(ramp)))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255 and (np.diff(out) >= 0).all()


def test_exif_orientation_is_applied(tmp_path):
    img = noisy_rgb(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = write(tmp_path, "rotated.jpg", encode(img, "JPEG", exif=exif.tobytes()))
    assert probe_image(data) == ImageInfo(80, 40, "RGB")  # stored size
    out = decode_rgb(data)
    assert out.size == (40, 80)
    assert out.getexif().get(0x0112) in (None, 1)


def test_one_pixel_image(tmp_path):
    data = write(tmp_path, "dot.png", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert probe_image(data) == ImageInfo(1, 1, "RGB")
    out = decode_rgb(data, min_side=224)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("side", [120, 200])  # 120: within 2x the limit (Pillow only warns); 200: beyond
def test_decompression_bomb_is_unreadable(tmp_path, monkeypatch, side):
    data = write(tmp_path, "big.png", encode(Image.new("RGB", (side, side)), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        probe_image(data)
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        decode_rgb(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", side * side)
    assert probe_image(data).width == side


def test_bomb_reason_names_pixels_and_limit(tmp_path, monkeypatch):
    data = encode(Image.new("L", (50, 40)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with pytest.raises(UnreadableImage) as caught:
        probe_image(data)
    assert caught.value.reason == "decompression bomb (2000 pixels > 1500)"


def test_draft_mode_on_made_jpeg_keeps_both_sides(tmp_path):
    data = write(tmp_path, "big.jpg", encode(noisy_rgb(1000, 700), "JPEG"))
    out = decode_rgb(data, min_side=160)
    assert out.size == (250, 175)  # 1/4 scale: 1/8 would give 88 < 160 on the short side
    assert decode_rgb(data).size == (1000, 700)


def test_draft_mode_on_real_full_resolution_jpeg():
    path = uda1_jpeg()
    data = path.read_bytes()
    info = probe_image(data)
    min_side = 256
    out = decode_rgb(data, min_side=min_side)
    assert out.mode == "RGB"
    assert out.width * out.height < info.width * info.height
    assert min(out.size) >= min(min_side, info.width, info.height)
    assert max(out.size) < max(info.width, info.height)


def test_real_isic2018_jpegs_probe_and_decode():
    folder = TEST_DATA / "isic2018-sample" / "images"
    files = sorted(folder.glob("*.jpg"))[:5] if folder.is_dir() else []
    if not files:
        pytest.skip(f"real ISIC 2018 JPEGs not found under {folder} (set DERMRAY_TEST_DATA)")
    for path in files:
        data = path.read_bytes()
        info = probe_image(data)
        assert (info.width, info.height) == (600, 450)
        assert decode_rgb(data, min_side=224).size == (300, 225)
