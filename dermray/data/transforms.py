"""Train and eval image presets: PIL RGB image in, HWC uint8 array of a fixed square size out.

Augmentation strengths are plain numbers (so Ray Tune can search them), and all randomness comes from an
explicit ``numpy.random.Generator``: Ray worker processes forked from one parent would otherwise share torch's
default seed and repeat the same "random" augmentations in every worker.

Geometry is one resampling step: a crop window (centre, size, angle) in the source image is mapped straight to
the output square (Pillow's antialiased resize for upright windows, one OpenCV affine warp for turned ones), so a
600x450 or draft-decoded photo is never rotated or resized twice. After the crop the image is a uint8 array:
flips and quarter turns are array views, and the colour jitter is a few vectorised float32 passes (per 224 px
image, the warp takes about 0.2 ms against Pillow's 0.8 ms, the jitter 0.25 ms against ImageEnhance's 0.75 ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from dermray.config import AugmentConfig, DataConfig

# Ray Data and the DataLoader already run one decode per CPU: OpenCV's own thread pool would oversubscribe them.
cv2.setNumThreads(1)

GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L" conversion

CROPS = ("rrc", "esteva", "none")
COLOR_CONSTANCY = ("none", "shades_of_gray")
SHADES_OF_GRAY_P = 6  # Finlayson & Trezzi's Minkowski norm; 6 is the value dermoscopy studies settled on


def shades_of_gray(pixels: np.ndarray, p: int = SHADES_OF_GRAY_P) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) on an HWC uint8 array: estimate the illuminant
    as each channel's Minkowski p-mean, then scale the channels so that the illuminant becomes grey, keeping the
    overall brightness. Dermoscopy collections mix cameras and light sources; Barata et al. (2015) and the
    ISIC 2018/2019 winning entries (Gessert et al.) normalise with it before training and inference alike."""
    x = pixels.astype(np.float32)
    illuminant = np.power(np.mean(np.power(x / 255.0, p), axis=(0, 1)), 1.0 / p)
    norm = float(np.sqrt(np.sum(illuminant * illuminant)))
    if not np.all(illuminant > 1e-6) or norm <= 0.0:
        return np.ascontiguousarray(pixels)  # a channel that is black everywhere: nothing to estimate from
    x *= 1.0 / (illuminant / norm * math.sqrt(3.0))
    np.clip(x, 0.0, 255.0, out=x)
    x += 0.5  # round, not truncate
    return x.astype(np.uint8)


def _check_color_constancy(value: object) -> None:
    if value not in COLOR_CONSTANCY:
        raise ValueError(f"color_constancy must be one of {COLOR_CONSTANCY}, got {value!r}")


def largest_inscribed_rect(width: float, height: float, angle_degrees: float) -> tuple[int, int]:
    """Width and height of the largest-area axis-aligned rectangle that fits inside a ``width`` x ``height``
    rectangle rotated by ``angle_degrees`` (both centred on the same point), rounded down to whole pixels.

    The closed form of the well-known "rotatedRectWithMaxArea" answer: when the short side is small relative
    to the turn, the best rectangle touches both long sides ("half constrained"), otherwise all four.
    """
    if width <= 0 or height <= 0:
        return 0, 0
    angle = math.radians(angle_degrees)
    sin_a, cos_a = abs(math.sin(angle)), abs(math.cos(angle))
    width_is_longer = width >= height
    side_long, side_short = (width, height) if width_is_longer else (height, width)
    if side_short <= 2.0 * sin_a * cos_a * side_long or abs(sin_a - cos_a) < 1e-10:
        # Half constrained: two corners of the rectangle touch the longer sides.
        x = 0.5 * side_short
        w, h = (x / sin_a, x / cos_a) if width_is_longer else (x / cos_a, x / sin_a)
    else:
        # Fully constrained: all four corners touch the rotated rectangle's sides.
        cos_2a = cos_a * cos_a - sin_a * sin_a
        w, h = (width * cos_a - height * sin_a) / cos_2a, (height * cos_a - width * sin_a) / cos_2a
    # The epsilon absorbs float error (90 degrees must give exactly (height, width)); never exceed the source.
    bound = max(width, height)
    return int(math.floor(min(w, bound) + 1e-6)), int(math.floor(min(h, bound) + 1e-6))


def _turn(dx: float, dy: float, angle_degrees: float) -> tuple[float, float]:
    """Where an offset in the rotated output lands in the source image, with Pillow's ``rotate`` convention
    (``Image.rotate(angle)`` samples source = centre + M @ (output - centre), M as below)."""
    phi = -math.radians(angle_degrees)
    c, s = math.cos(phi), math.sin(phi)
    return c * dx + s * dy, -s * dx + c * dy


def _bbox(w: float, h: float, angle_degrees: float) -> tuple[float, float]:
    """Size of the axis-aligned bounding box of a ``w`` x ``h`` rectangle turned by the angle."""
    a = math.radians(angle_degrees)
    c, s = abs(math.cos(a)), abs(math.sin(a))
    return w * c + h * s, w * s + h * c


def _margin(w: float, h: float, out_size: int) -> float:
    # How far past a window's edge resampling reads, in source pixels: the antialiased pre-shrink and the
    # bilinear sampling each read about one output pixel's worth (w / out_size source pixels) beyond it.
    # Callers keep this band inside the photo, so no zero-fill of a turned window leaks into the output.
    return 2.0 + 2.0 * max(w, h) / out_size


def _resample_window(
    img: Image.Image, centre: tuple[float, float], size: tuple[float, float], angle: float, out_size: int
) -> np.ndarray:
    """The ``size`` window centred at ``centre`` (source pixel coordinates), turned by ``angle`` degrees,
    resampled to an ``out_size`` x ``out_size`` x 3 uint8 array. Callers keep the window plus ``_margin`` inside
    the image."""
    (cx, cy), (w, h) = centre, size
    if angle % 360.0 == 0.0:
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        return np.asarray(img.resize((out_size, out_size), Image.Resampling.BILINEAR, box=box))
    # A turned window is one affine map from output pixels to source pixels, so only out_size**2 samples are
    # computed (the whole photo is never rotated). Bilinear sampling does not antialias, so a window much
    # larger than the output is first shrunk by the whole factor nearest its scale, averaging f x f blocks (an
    # integer OpenCV area resize takes 0.07 ms where Pillow's antialiased resize to the exact scale took 1.5 ms
    # for a 600x450 photo); the warp then resamples at 0.67x to 1.5x.
    factor = max(1, round(min(w, h) / out_size))
    m = _margin(w, h, out_size)
    bw, bh = _bbox(w + 2 * m, h + 2 * m, angle)
    pixels = np.asarray(img)
    left, top = 0, 0
    if factor > 1:
        left, top = max(0, math.floor(cx - bw / 2)), max(0, math.floor(cy - bh / 2))
        right, bottom = min(img.width, math.ceil(cx + bw / 2)), min(img.height, math.ceil(cy + bh / 2))
        # Whole blocks only (up to factor - 1 pixels of the margin band are left out at the far edges).
        pw, ph = max(1, (right - left) // factor), max(1, (bottom - top) // factor)
        pixels = cv2.resize(pixels[top:top + ph * factor, left:left + pw * factor], (pw, ph),
                            interpolation=cv2.INTER_AREA)
    kx = ky = float(factor)
    # Output pixel (u, v) -> window offset ((u - S/2) w/S, (v - S/2) h/S) -> turned -> source -> patch.
    phi = -math.radians(angle)
    c, s = math.cos(phi), math.sin(phi)
    sx, sy = w / out_size, h / out_size
    a, b = c * sx / kx, s * sy / kx
    d, e = -s * sx / ky, c * sy / ky
    off_x = (cx - left - (c * w + s * h) / 2) / kx
    off_y = (cy - top + (s * w - c * h) / 2) / ky
    # That map is in continuous coordinates (a pixel spans [i, i + 1]); OpenCV's puts pixel centres on integers:
    # output pixel x samples the source at a (x + 0.5) + b (y + 0.5) + off_x - 0.5.
    matrix = np.array([[a, b, (a + b) / 2 + off_x - 0.5], [d, e, (d + e) / 2 + off_y - 0.5]])
    return cv2.warpAffine(pixels, matrix, (out_size, out_size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def _sample_rrc_box(
    width: float,
    height: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box (left, top, w, h) inside a ``width`` x ``height`` area: area
    fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``; 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target_area * aspect), math.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            return rng.uniform(0, width - w), rng.uniform(0, height - h), w, h
    # Fallback (extreme aspect ratios): the whole area, trimmed to the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    return (width - w) / 2, (height - h) / 2, w, h


def _adjust_hue(pixels: np.ndarray, hue_factor: float) -> np.ndarray:
    """Shift the hue of float RGB ``pixels`` by ``hue_factor`` of a full turn (as torchvision does for PIL: HSV,
    wrap-around H)."""
    img = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.uint8).astype(np.int16) + int(round(hue_factor * 255))) % 256
    turned = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")
    return np.asarray(turned, dtype=np.float32)


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def _check_config_ranges(section: type[BaseModel], values: dict) -> None:
    """Raise ValueError naming the field when ``values`` break ``section``'s range constraints."""
    try:
        section.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        name = first["loc"][0]
        raise ValueError(f"{name}: {first['msg'].lower()}, got {values[name]!r}") from None


def _check_image_size(image_size: object) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def _as_rgb(img: Image.Image) -> Image.Image:
    # decode_rgb already returns RGB; this guards direct callers (tests, notebooks) passing L or RGBA.
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class TrainPreset:
    """Training augmentation: a random crop (``rrc`` or ``esteva``), flips and colour jitter.

    * ``rrc``: torchvision's RandomResizedCrop (area fraction in [scale_min, 1], aspect in [ratio_min,
      ratio_max]); with ``rotation_degrees`` > 0 the crop window is also turned by an angle in [-r, r] and
      shrunk/moved just enough to stay inside the photo (no black corners).
    * ``esteva``: turn by an angle in [-r, r] (r = 180: any angle), keep the largest upright rectangle inside
      the turned photo, then a RandomResizedCrop inside that (Esteva et al., Nature 2017).
    * ``none``: the whole photo, resized to the output square (for tiny inputs such as 28 px DermaMNIST,
      where any crop loses the lesion's border).

    After the crop: horizontal and vertical flips, and with probability ``rot90_p`` a quarter, half or
    three-quarter turn (with both flips, the 8 symmetries of the square: exact, no resampling).

    Colour jitter follows torchvision's ColorJitter: factors uniform in [1 - s, 1 + s] for brightness,
    contrast and saturation, a hue shift uniform in [-hue, hue], applied in a random order.
    """

    image_size: int
    crop: str = "rrc"
    scale_min: float = 0.35
    ratio_min: float = 3 / 4
    ratio_max: float = 4 / 3
    rotation_degrees: float = 0.0
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90_p: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.0
    color_constancy: str = "none"

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        _check_color_constancy(self.color_constancy)
        for f in fields(self):
            if f.name not in ("image_size", "crop", "color_constancy"):
                value = getattr(self, f.name)
                if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                    raise ValueError(f"{f.name} must be a number, got {value!r}")
        _check_range("ratio_min", self.ratio_min, 0.0, math.inf, low_open=True)
        _check_range("ratio_max", self.ratio_max, self.ratio_min, math.inf)
        # The strengths' ranges have one home, the experiment config's AugmentConfig (which also documents them).
        _check_config_ranges(AugmentConfig, {name: float(getattr(self, name)) for name in AugmentConfig.model_fields
                                             if name != "crop"})

    def _angle(self, rng: np.random.Generator) -> float:
        return (
            float(rng.uniform(-self.rotation_degrees, self.rotation_degrees))
            if self.rotation_degrees
            else 0.0
        )

    def _crop_rrc(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        width, height, size = img.width, img.height, self.image_size
        left, top, w, h = _sample_rrc_box(
            width, height, (self.scale_min, 1.0), (self.ratio_min, self.ratio_max), rng
        )
        cx, cy = left + w / 2, top + h / 2
        angle = self._angle(rng)
        if angle:
            # Shrink the window until its turned footprint (plus the resampling margin) fits in the photo; the
            # margin shrinks with the window, so the one computed at full size is a safe bound.
            m = _margin(w, h, size)
            c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
            fit = min(
                1.0, (width - 2 * m * (c + s)) / (w * c + h * s), (height - 2 * m * (c + s)) / (w * s + h * c)
            )
            if fit <= 0.05:
                angle = 0.0  # a photo too small to turn inside; keep the plain crop
            else:
                w, h = w * fit, h * fit
                bw, bh = _bbox(w + 2 * m, h + 2 * m, angle)
                cx = min(max(cx, bw / 2), width - bw / 2)
                cy = min(max(cy, bh / 2), height - bh / 2)
        return _resample_window(img, (cx, cy), (w, h), angle, size)

    def _crop_esteva(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        width, height, size = img.width, img.height, self.image_size
        angle = self._angle(rng)
        inner_w, inner_h = (width, height) if not angle else largest_inscribed_rect(width, height, angle)
        if angle:
            m = _margin(inner_w, inner_h, size)
            inner_w, inner_h = inner_w - 2 * m, inner_h - 2 * m
            if inner_w < 1 or inner_h < 1:
                angle, inner_w, inner_h = 0.0, width, height  # too small to turn
        left, top, w, h = _sample_rrc_box(
            inner_w, inner_h, (self.scale_min, 1.0), (self.ratio_min, self.ratio_max), rng
        )
        # The crop box lives in the turned frame, centred on the photo's centre; map its centre back.
        dx, dy = _turn(left + w / 2 - inner_w / 2, top + h / 2 - inner_h / 2, angle)
        return _resample_window(img, (width / 2 + dx, height / 2 + dy), (w, h), angle, size)

    def _jitter(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """torchvision's ColorJitter on a uint8 HWC array, in float32: brightness scales, contrast blends with the
        mean grey level, saturation with each pixel's grey, hue turns in HSV; in a random order, each clipped to
        [0, 255] like Pillow's 8-bit steps."""
        x = None
        for op in rng.permutation(4):
            if op == 0 and self.brightness > 0:
                factor = rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
                x = pixels.astype(np.float32) if x is None else x
                x *= factor
            elif op == 1 and self.contrast > 0:
                factor = rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
                x = pixels.astype(np.float32) if x is None else x
                mean = float((x @ GRAY_WEIGHTS).mean())
                x *= factor
                x += (1 - factor) * mean
            elif op == 2 and self.saturation > 0:
                factor = rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
                x = pixels.astype(np.float32) if x is None else x
                gray = (x @ GRAY_WEIGHTS)[..., None]
                x *= factor
                x += (1 - factor) * gray
            elif op == 3 and self.hue > 0:
                x = _adjust_hue(pixels.astype(np.float32) if x is None else x, rng.uniform(-self.hue, self.hue))
            else:
                continue
            np.clip(x, 0.0, 255.0, out=x)
        if x is None:
            return np.ascontiguousarray(pixels)
        x += 0.5  # round, not truncate
        return x.astype(np.uint8)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """One random augmentation of ``img``: an (image_size, image_size, 3) uint8 array. Deterministic for a
        given generator state; consumes draws from ``rng`` only."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"TrainPreset needs a numpy.random.Generator, got {type(rng).__name__}")
        img = _as_rgb(img)
        if self.crop == "none":
            size = (self.image_size, self.image_size)
            pixels = np.asarray(img if img.size == size else img.resize(size, Image.Resampling.BILINEAR,
                                                                        reducing_gap=3.0))
        else:
            pixels = self._crop_esteva(img, rng) if self.crop == "esteva" else self._crop_rrc(img, rng)
        # Flips and quarter turns as array views (Pillow's ROTATE_90 is counter-clockwise, as is np.rot90).
        if rng.random() < self.hflip_p:
            pixels = pixels[:, ::-1]
        if rng.random() < self.vflip_p:
            pixels = pixels[::-1]
        if self.rot90_p and rng.random() < self.rot90_p:
            pixels = np.rot90(pixels, k=1 + int(rng.integers(0, 3)))
        if self.color_constancy == "shades_of_gray":
            pixels = shades_of_gray(pixels)  # before the jitter, which then varies a normalised colour
        return self._jitter(pixels, rng)


@dataclass(frozen=True)
class EvalPreset:
    """Deterministic evaluation view: shorter side resized to ``image_size / resize_ratio``, then the central
    ``image_size`` square (torchvision's reference convention, e.g. 256 -> 224 at 0.875)."""

    image_size: int
    resize_ratio: float = 0.875
    color_constancy: str = "none"

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        _check_color_constancy(self.color_constancy)
        if isinstance(self.resize_ratio, bool) or not isinstance(self.resize_ratio, int | float | np.number):
            raise ValueError(f"resize_ratio must be a number, got {self.resize_ratio!r}")
        _check_config_ranges(DataConfig, {"resize_ratio": float(self.resize_ratio)})

    @property
    def resize_size(self) -> int:
        """The shorter side after the resize step."""
        return max(self.image_size, int(round(self.image_size / self.resize_ratio)))

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        """The (image_size, image_size, 3) uint8 centre view of ``img``; ``rng`` is unused (deterministic)."""
        img = _as_rgb(img)
        # Resize-then-centre-crop done as one resample: the central square of the resized image is, in source
        # pixels, a square of side shorter_side * image_size / resize_size around the centre.
        side = min(img.width, img.height) * self.image_size / self.resize_size
        cx, cy = img.width / 2, img.height / 2
        pixels = np.array(_resample_window(img, (cx, cy), (side, side), 0.0, self.image_size), dtype=np.uint8)
        return shades_of_gray(pixels) if self.color_constancy == "shades_of_gray" else pixels


def decode_size_hint(preset: TrainPreset | EvalPreset) -> int:
    """The ``min_side`` to pass to ``decode_rgb``: JPEG draft decoding keeps both sides at least this long,
    which is enough for the preset's output not to be upsampled from a needlessly reduced decode."""
    if isinstance(preset, EvalPreset):
        return preset.resize_size
    # A random resized crop keeps at least sqrt(scale_min) of each side, but a little headroom keeps the
    # larger crops sharp; a turned crop (esteva, or rrc with rotation) keeps ~1/sqrt(2) of the side at 45.
    if preset.crop == "none":
        return preset.image_size
    hint = preset.image_size * 1.15
    if preset.crop == "esteva" or preset.rotation_degrees > 0:
        hint *= math.sqrt(2)
    return int(math.ceil(hint))
