"""dermray.data.transforms: presets give fixed-size uint8 arrays, are driven only by the given rng, and the Esteva
rotate-and-crop never shows zero-filled corners."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermray.data.imaging import decode_rgb
from dermray.data.transforms import EvalPreset, TrainPreset, decode_size_hint, largest_inscribed_rect

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("DERMRAY_TEST_DATA", REPO.parent / "shared" / "data"))

NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def isic_images(count: int = 4) -> list[Image.Image]:
    folder = TEST_DATA / "isic2018-sample" / "images"
    files = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    if not files:
        pytest.skip(f"real ISIC 2018 JPEGs not found under {folder} (set DERMRAY_TEST_DATA)")
    return [Image.open(path).convert("RGB") for path in files]


ALL_PRESETS = [
    TrainPreset(image_size=224),
    TrainPreset(image_size=224, rotation_degrees=45, hue=0.05),
    TrainPreset(image_size=299, crop="esteva", rotation_degrees=180),
    TrainPreset(image_size=64, crop="esteva", rotation_degrees=30, scale_min=1.0),
    EvalPreset(image_size=224),
    EvalPreset(image_size=64, resize_ratio=1.0),
]


@pytest.mark.parametrize("preset", ALL_PRESETS, ids=repr)
def test_shapes_on_real_isic_jpegs(preset):
    rng = np.random.default_rng(0)
    for img in isic_images():
        # As in ingest: decoded through draft mode at the preset's size hint.
        out = preset(img, rng)
        assert out.shape == (preset.image_size, preset.image_size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("preset", ALL_PRESETS, ids=repr)
@pytest.mark.parametrize("size", [(600, 450), (450, 600), (97, 96), (40, 300), (1, 1)])
def test_shapes_on_made_images(preset, size):
    out = preset(noisy_rgb(*size), np.random.default_rng(1))
    assert out.shape == (preset.image_size, preset.image_size, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_non_rgb_input_is_converted():
    gray = Image.new("L", (120, 90), 128)
    assert TrainPreset(32)(gray, np.random.default_rng(0)).shape == (32, 32, 3)
    assert EvalPreset(32)(gray.convert("RGBA")).shape == (32, 32, 3)


def test_decode_size_hint_path_on_real_jpeg():
    folder = TEST_DATA / "isic2018-sample" / "images"
    files = sorted(folder.glob("*.jpg"))[:1] if folder.is_dir() else []
    if not files:
        pytest.skip(f"real ISIC 2018 JPEGs not found under {folder} (set DERMRAY_TEST_DATA)")
    for preset in (TrainPreset(224), EvalPreset(224), TrainPreset(112, crop="esteva", rotation_degrees=180)):
        img = decode_rgb(files[0].read_bytes(), min_side=decode_size_hint(preset))
        assert min(img.size) >= decode_size_hint(preset)
        assert preset(img, np.random.default_rng(0)).shape == (preset.image_size, preset.image_size, 3)


@pytest.mark.parametrize(
    "preset",
    [
        TrainPreset(96, hue=0.1),
        TrainPreset(96, rotation_degrees=90),
        TrainPreset(96, crop="esteva", rotation_degrees=180, hue=0.05),
    ],
    ids=repr,
)
def test_same_seed_same_output_different_seed_different(preset):
    img = noisy_rgb(300, 225)
    first = preset(img, np.random.default_rng(7))
    again = preset(img, np.random.default_rng(7))
    other = preset(img, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    # Successive draws from one generator differ too (each image gets its own augmentation).
    rng = np.random.default_rng(7)
    assert not np.array_equal(preset(img, rng), preset(img, rng))


def test_randomness_comes_only_from_the_given_generator():
    import random

    import torch

    img = noisy_rgb(200, 150)
    preset = TrainPreset(64, rotation_degrees=180, hue=0.1)
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    first = preset(img, np.random.default_rng(3))
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    assert np.array_equal(first, preset(img, np.random.default_rng(3)))
    with pytest.raises(TypeError):
        preset(img, None)


def test_eval_preset_is_deterministic_and_centre_crops():
    # A centred white square on black: the centre view at ratio 1.0 keeps the middle of the shorter side.
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[100:200, 150:250] = 255
    img = Image.fromarray(arr)
    out = EvalPreset(image_size=30, resize_ratio=1.0)(img)
    assert np.array_equal(out, EvalPreset(image_size=30, resize_ratio=1.0)(img, np.random.default_rng(0)))
    assert out[15, 15].min() > 250 and out[0, 0].max() < 5 and out[-1, -1].max() < 5
    # Symmetric input -> symmetric output (no half-pixel shift).
    assert np.abs(out.astype(int) - out[::-1, ::-1].astype(int)).max() <= 1
    assert EvalPreset(224).resize_size == 256 and decode_size_hint(EvalPreset(224)) == 256


def test_decode_size_hint_train():
    assert decode_size_hint(TrainPreset(224)) == math.ceil(224 * 1.15)
    assert decode_size_hint(TrainPreset(224, crop="esteva", rotation_degrees=180)) > decode_size_hint(
        TrainPreset(224)
    )


def test_largest_inscribed_rect_known_values():
    assert largest_inscribed_rect(600, 450, 0) == (600, 450)
    assert largest_inscribed_rect(600, 450, 90) == (450, 600)
    assert largest_inscribed_rect(600, 450, 180) == (600, 450)
    assert largest_inscribed_rect(450, 600, -90) == (600, 450)
    side = 1000
    w, h = largest_inscribed_rect(side, side, 45)
    assert abs(w - side / math.sqrt(2)) <= 1 and abs(h - side / math.sqrt(2)) <= 1
    assert largest_inscribed_rect(0, 10, 30) == (0, 0)


@pytest.mark.parametrize("width,height", [(600, 450), (450, 600), (300, 300), (1000, 100)])
def test_largest_inscribed_rect_fits_and_is_symmetric(width, height):
    for angle in np.linspace(-180, 180, 73):
        w, h = largest_inscribed_rect(width, height, angle)
        assert (w, h) == largest_inscribed_rect(width, height, -angle)
        assert 0 < w <= max(width, height) and 0 < h <= max(width, height)
        # Every corner of the centred w x h rectangle, turned back by the angle, lies in the source rectangle.
        a = math.radians(angle)
        for sx in (-1, 1):
            for sy in (-1, 1):
                x, y = sx * w / 2, sy * h / 2
                xr, yr = x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)
                assert abs(xr) <= width / 2 + 1e-6 and abs(yr) <= height / 2 + 1e-6


@pytest.mark.parametrize("size", [(600, 450), (450, 600), (97, 96), (3000, 2000)])
@pytest.mark.parametrize("out", [32, 224])
@pytest.mark.parametrize("crop", ["esteva", "rrc"])
def test_turned_crops_have_no_black_corners(size, out, crop):
    bright = Image.new("RGB", size, (230, 230, 230))
    preset = TrainPreset(out, crop=crop, rotation_degrees=180, **NO_JITTER)
    rng = np.random.default_rng(11)
    for _ in range(60):
        assert preset(bright, rng).min() >= 229


def test_esteva_full_scale_crop_has_no_black_corners_on_large_turns():
    # scale_min=1 asks for the whole inscribed rectangle: the tightest fit to the turned border.
    bright = Image.new("RGB", (600, 450), (250, 250, 250))
    preset = TrainPreset(128, crop="esteva", rotation_degrees=180, scale_min=1.0, **NO_JITTER)
    rng = np.random.default_rng(5)
    assert min(int(preset(bright, rng).min()) for _ in range(200)) >= 249


def test_esteva_crop_really_rotates():
    # A horizontal gradient turned by ~90 degrees becomes (mostly) vertical.
    grad = Image.fromarray(np.tile(np.linspace(0, 255, 400).astype(np.uint8), (400, 1)), "L").convert("RGB")
    preset = TrainPreset(
        64, crop="esteva", rotation_degrees=180, scale_min=1.0, hflip_p=0, vflip_p=0, **NO_JITTER
    )
    saw_vertical = False
    rng = np.random.default_rng(0)
    for _ in range(40):
        out = preset(grad, rng)[..., 0].astype(float)
        dx, dy = np.abs(np.diff(out, axis=1)).mean(), np.abs(np.diff(out, axis=0)).mean()
        saw_vertical |= dy > 3 * dx
    assert saw_vertical


def test_flips_follow_their_probabilities():
    img = noisy_rgb(64, 64)
    never = TrainPreset(64, scale_min=1.0, ratio_min=1.0, ratio_max=1.0, hflip_p=0, vflip_p=0, **NO_JITTER)
    always = TrainPreset(64, scale_min=1.0, ratio_min=1.0, ratio_max=1.0, hflip_p=1, vflip_p=1, **NO_JITTER)
    plain = never(img, np.random.default_rng(0))
    assert np.array_equal(plain, np.asarray(img))
    assert np.array_equal(always(img, np.random.default_rng(0)), plain[::-1, ::-1])


def test_colour_jitter_changes_colours_within_bounds():
    img = Image.new("RGB", (64, 64), (120, 100, 80))
    base = TrainPreset(32, **NO_JITTER)(img, np.random.default_rng(0)).astype(int)
    bright = TrainPreset(32, brightness=0.5, contrast=0, saturation=0, hue=0)
    means = [bright(img, np.random.default_rng(s)).mean() for s in range(20)]
    assert min(means) < base.mean() - 5 and max(means) > base.mean() + 5
    assert all(base.mean() * 0.45 <= m <= base.mean() * 1.55 for m in means)
    hue = TrainPreset(32, brightness=0, contrast=0, saturation=0, hue=0.5)
    assert len({tuple(hue(img, np.random.default_rng(s))[0, 0]) for s in range(10)}) > 5


@pytest.mark.parametrize(
    "field,value",
    [
        ("image_size", 0),
        ("image_size", 2.5),
        ("image_size", True),
        ("crop", "random"),
        ("scale_min", 0.0),
        ("scale_min", 1.5),
        ("ratio_min", -1.0),
        ("ratio_max", 0.5),
        ("rotation_degrees", -1.0),
        ("rotation_degrees", 181.0),
        ("hflip_p", 1.5),
        ("vflip_p", -0.1),
        ("brightness", -0.1),
        ("brightness", float("nan")),
        ("contrast", 2.0),
        ("saturation", -1.0),
        ("hue", 0.6),
        ("hue", "0.1"),
    ],
)
def test_invalid_train_strengths_raise_value_error_naming_the_field(field, value):
    kwargs = {"image_size": 64, field: value}
    with pytest.raises(ValueError, match=field):
        TrainPreset(**kwargs)


@pytest.mark.parametrize("field,value", [("image_size", -3), ("resize_ratio", 0.0), ("resize_ratio", 1.2)])
def test_invalid_eval_settings_raise_value_error(field, value):
    kwargs = {"image_size": 64, field: value}
    with pytest.raises(ValueError, match=field):
        EvalPreset(**kwargs)


def test_presets_accept_numpy_numbers_from_a_tuner():
    preset = TrainPreset(np.int64(64), rotation_degrees=np.float64(30.0), brightness=np.float32(0.2))
    assert preset(noisy_rgb(100, 80), np.random.default_rng(0)).shape == (64, 64, 3)


def test_whole_image_crop_with_flips_and_quarter_turns_gives_the_eight_symmetries():
    preset = TrainPreset(image_size=28, crop="none", rot90_p=1.0, hflip_p=0.5, vflip_p=0.5, brightness=0.0,
                         contrast=0.0, saturation=0.0)
    image = Image.fromarray(np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3))
    views = {preset(image, np.random.default_rng(seed)).tobytes() for seed in range(300)}
    assert len(views) == 8  # exact transposes: the dihedral group of the square, nothing resampled
    assert all(sorted(np.frombuffer(v, np.uint8)) == sorted(np.asarray(image).ravel()) for v in list(views)[:2])
    assert decode_size_hint(preset) == 28
