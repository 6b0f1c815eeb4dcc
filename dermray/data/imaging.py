"""Decoding image bytes into RGB pictures, and telling readable images from broken ones.

Every image that enters a manifest passes ``probe_image`` at staging time, and every image that enters a batch
passes ``decode_rgb``. Both raise ``UnreadableImage`` with a short reason (never a Pillow exception, never an
out-of-memory kill), so callers can count and log skips instead of crashing a Ray task.

Policy decisions, each made once here:

* Truncated files are errors. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` would instead fill the missing part
  with grey and hand a silently wrong image to training; we force it back to False.
* Images above ``PIL.Image.MAX_IMAGE_PIXELS`` are errors ("decompression bomb"), including the band between
  the limit and twice the limit where Pillow only warns.
* Transparent pixels are composited onto white (the background of most clinical photo exports), not black.
* 16-bit and 32-bit grey images are scaled to 8 bits by their range; a plain ``convert("RGB")`` clips them.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# The side Pillow's JPEG draft mode aims at when probing: libjpeg then decodes at 1/8 scale (a fraction of the
# full decode's cost) but still reads every entropy-coded byte, so a truncated file is still caught.
_PROBE_DRAFT_SIDE = 64

# Exceptions Pillow's decoders raise on malformed input. Plugins are not consistent: besides OSError they
# raise SyntaxError (bad headers), ValueError/struct.error/IndexError (bad tables) and EOFError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class UnreadableImage(Exception):
    """Bytes that do not decode to a usable image; ``reason`` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """An image's stored size (before any EXIF rotation or draft scaling) and Pillow mode."""

    width: int
    height: int
    mode: str


def _refuse_truncated_images() -> None:
    # Another library in the process may have switched this global on; with it Pillow pads a truncated JPEG
    # with grey and reports success, which would put a half-grey lesion into training with a real label.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("dermray: resetting PIL.ImageFile.LOAD_TRUNCATED_IMAGES to False (truncated = error)")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _bomb_reason(size: tuple[int, int]) -> str | None:
    """The decompression-bomb reason for an image of this size, or None when it is within the limit."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return None
    pixels = max(1, size[0]) * max(1, size[1])
    return f"decompression bomb ({pixels} pixels > {limit})" if pixels > limit else None


def _reason_for(error: Exception) -> str:
    """A short reason string for a Pillow decode failure."""
    text = str(error)
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        # Same wording as _bomb_reason, whichever of Pillow's checks fired first.
        pixels = re.search(r"\((\d+) pixels\)", text)
        if pixels:
            return f"decompression bomb ({pixels.group(1)} pixels > {Image.MAX_IMAGE_PIXELS})"
        return f"decompression bomb ({text})"
    lowered = text.lower()
    if isinstance(error, EOFError) or "truncated" in lowered or "broken data stream" in lowered:
        return "truncated"
    return f"corrupt ({type(error).__name__}: {text})" if text else f"corrupt ({type(error).__name__})"


def _open_and_load(data: bytes, draft_side: int | None) -> tuple[Image.Image, ImageInfo]:
    """Open ``data``, check its size against the bomb limit, optionally switch JPEG draft mode on, and decode
    every pixel. Returns the loaded image and the stored (pre-draft) size and mode."""
    if not data:
        raise UnreadableImage("empty file")
    _refuse_truncated_images()
    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; turning the warning into an error makes a
    # huge image a counted skip rather than an OOM-killed worker. The explicit size check below does not rely
    # on the warnings filter (catch_warnings is process-global, not thread-local, state on Python < 3.14).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise UnreadableImage("not an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, *_DECODE_ERRORS) as error:
            raise UnreadableImage(_reason_for(error)) from None
        info = ImageInfo(width=int(img.width), height=int(img.height), mode=str(img.mode))
        bomb = _bomb_reason(img.size)
        if bomb:
            raise UnreadableImage(bomb)
        try:
            if draft_side is not None and img.format in ("JPEG", "MPO"):
                # Decode at the largest 1/2, 1/4 or 1/8 scale that keeps both sides >= draft_side: libjpeg
                # skips most of the inverse DCT work, which is most of the cost for a 3072x2304 dermoscopy.
                img.draft("RGB", (draft_side, draft_side))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, *_DECODE_ERRORS) as error:
            raise UnreadableImage(_reason_for(error)) from None
    if img.width < 1 or img.height < 1:
        raise UnreadableImage("empty image (zero width or height)")
    return img, info


def probe_image(data: bytes) -> ImageInfo:
    """Verify that ``data`` decodes completely and return its stored width, height and mode.

    A real decode, not just a header read (``Image.open`` alone accepts truncated files); JPEGs are decoded at
    reduced scale, which still reads every byte. Raises ``UnreadableImage`` for empty, non-image, truncated,
    corrupt and over-limit ("decompression bomb") data.
    """
    _, info = _open_and_load(data, draft_side=_PROBE_DRAFT_SIDE)
    return info


def _to_uint8_gray(img: Image.Image) -> Image.Image:
    """An 8-bit L image from a 16-bit, 32-bit integer or float single-channel image, scaled by its range."""
    values = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        # The container's full range: 65535 -> 255 keeps relative brightness across images of a dataset.
        out = (values.astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(out, "L")
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode == "I" and lo >= 0 and hi <= 255:
        scaled = values  # 8-bit data in a 32-bit container (e.g. some TIFFs)
    elif img.mode == "I" and lo >= 0 and hi <= 65535:
        scaled = values / 256.0  # 16-bit data Pillow opened as "I" (e.g. 16-bit grey PNGs in some versions)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    else:
        # Anything else has no conventional range: stretch what is there (a constant image maps to 0).
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _flatten_onto_white(img: Image.Image) -> Image.Image:
    """RGB from an image with an alpha channel (or palette transparency), composited onto white."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha composited onto white, high bit depths scaled (not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _to_uint8_gray(img).convert("RGB")
    has_transparency_key = mode in ("P", "L", "RGB") and "transparency" in img.info
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or has_transparency_key:
        return _flatten_onto_white(img)
    # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK when reading), YCbCr, RGBX, HSV, P without transparency.
    return img.convert("RGB")


def _turn_upright(img: Image.Image) -> None:
    try:
        # In place: otherwise Pillow returns a copy of every photo, even those with nothing to turn (0.85 ms of
        # the ~9 ms a 600x450 ISIC JPEG takes from bytes to an augmented 224 px crop).
        ImageOps.exif_transpose(img, in_place=True)
    except _DECODE_ERRORS as error:
        # A damaged EXIF block does not damage the pixels; keep them as stored rather than drop the image.
        log.debug("dermray: ignoring unreadable EXIF orientation (%s)", error)


def decode_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode ``data`` into an 8-bit RGB image, upright according to its EXIF orientation.

    With ``min_side``, a JPEG is decoded in draft mode at the strongest 1/2, 1/4 or 1/8 reduction that keeps
    both sides >= ``min_side`` (an image already smaller decodes at full size); other formats decode at full
    size. Callers resize afterwards, so this only saves decode time.
    Raises ``UnreadableImage`` like ``probe_image``.
    """
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")
    img, _ = _open_and_load(data, draft_side=min_side)
    _turn_upright(img)
    try:
        return to_rgb(img)
    except _DECODE_ERRORS as error:
        # E.g. LAB or multi-band float modes Pillow cannot convert to RGB.
        raise UnreadableImage(f"unsupported mode {img.mode} ({error})") from None


def probe_thumbnail(data: bytes) -> tuple[ImageInfo, Image.Image | None]:
    """``probe_image``'s check and stored size, plus the decoded picture it made on the way: RGB, upright by its
    EXIF orientation, at the reduced draft scale (both sides >= 64 px for a JPEG; full size otherwise), or None
    for a mode with no RGB conversion (``probe_image`` accepts such an image, so this does too).

    One decode serves both the readability check and the perceptual hash of ``dermray.data.duplicates``, so staging
    opens and decodes each image once. Raises ``UnreadableImage`` like ``probe_image``."""
    img, info = _open_and_load(data, draft_side=_PROBE_DRAFT_SIDE)
    _turn_upright(img)
    try:
        return info, to_rgb(img)
    except _DECODE_ERRORS as error:
        log.debug("dermray: no RGB picture for mode %s (%s)", img.mode, error)
        return info, None
