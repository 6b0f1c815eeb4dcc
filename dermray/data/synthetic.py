"""Procedural dermoscopy-like lesion images: the embedded default dataset, made locally in seconds.

Four classes that differ the way the dermoscopy "ABCD" rule describes real lesions: Asymmetry, Border
irregularity, Colour variegation and Diameter. Each property overlaps between classes (brown is shared by
three of them, sizes overlap, some melanomas have red areas), so no single statistic separates them, but
together they are learnable by a small CNN at 64 px within a few epochs:

* nevus: small to medium, round and symmetric, smooth soft border, one even brown with a faint network.
* melanoma: large, asymmetric, ragged border that is sharp on one side and fading on the other, several
  colours (dark brown/black blotches, blue-grey veil, red, white regression areas) and scattered dark dots.
* keratosis: medium, sharp "stuck-on" border, light to mid brown, cerebriform ridges, white milia-like cysts
  and dark comedo-like openings.
* vascular: small, round, sharp border, red to purple lacunae on a lighter red base.

Every image also gets patient- and photo-level nuisances: skin tone, blotchy skin texture, a lighting
gradient, a dark dermatoscope vignette, hairs, sensor noise and a white-balance shift. A lesion is rendered in
several views (rotation, shift, zoom, lighting, hair): the views share a group id so a grouped split keeps
them together, as with the several dermoscopy photos taken of one real lesion.
"""

from __future__ import annotations

import functools
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dermray import storage

SYNTHETIC_CLASSES = ("nevus", "melanoma", "keratosis", "vascular")

JPEG_QUALITY = 90

# Skin tones (RGB) from light to dark, plus a pinkish one: the background a lesion sits on varies by patient.
_SKIN_TONES = np.array(
    [(238, 205, 185), (228, 186, 160), (214, 168, 138), (190, 142, 110), (160, 112, 84), (236, 196, 190)],
    dtype=np.float64,
)


@dataclass(frozen=True)
class _ClassStyle:
    """Ranges a class's lesions are drawn from (lengths in units of the image half-width)."""

    radius: tuple[float, float]
    asymmetry: tuple[float, float]  # amplitude of the 2nd and 3rd border harmonics (relative to the radius)
    irregularity: tuple[float, float]  # amplitude of the 4th..14th harmonics
    softness: tuple[float, float]  # border blur, relative to the radius
    softness_variation: tuple[float, float]  # how much the blur varies around the border (0: even)
    colour_dark: tuple[float, float, float]  # the base colour is a mix of these two
    colour_light: tuple[float, float, float]


_STYLES: dict[str, _ClassStyle] = {
    "nevus": _ClassStyle(
        (0.22, 0.42), (0.0, 0.05), (0.004, 0.012), (0.07, 0.13), (0.0, 0.2), (105, 62, 40), (178, 124, 88)
    ),
    "melanoma": _ClassStyle(
        (0.42, 0.72), (0.08, 0.2), (0.025, 0.06), (0.04, 0.14), (0.5, 0.9), (85, 52, 38), (160, 108, 78)
    ),
    "keratosis": _ClassStyle(
        (0.32, 0.58), (0.03, 0.09), (0.012, 0.03), (0.015, 0.035), (0.0, 0.3), (118, 84, 60), (192, 152, 112)
    ),
    "vascular": _ClassStyle(
        (0.18, 0.36), (0.0, 0.06), (0.004, 0.015), (0.02, 0.05), (0.0, 0.3), (125, 38, 68), (202, 84, 98)
    ),
}

_HARMONICS = np.arange(2, 15)
_ANGLE_TABLE = 721  # samples of the border's radius over a full turn


@dataclass(frozen=True)
class _Lesion:
    """One lesion, in lesion coordinates (centre at the origin, image half-width = 1)."""

    label: int
    radius: float
    amplitudes: np.ndarray  # per harmonic in _HARMONICS, relative to the radius
    phases: np.ndarray
    softness: float
    softness_variation: float
    softness_phase: float
    colour: np.ndarray  # (3,) base colour
    centre_shade: float  # > 0 darker centre, < 0 lighter centre
    blobs: np.ndarray  # (N, 7): x, y, sigma, r, g, b, alpha (colour patches inside the lesion)
    network: float  # strength of the pigment network (0: none)
    network_freq: float
    network_phase: tuple[float, float]
    ridges: float  # strength of cerebriform ridges (0: none)
    ridge_freq: float
    ridge_angle: float
    skin: np.ndarray  # (3,) the patient's skin tone


@dataclass(frozen=True)
class _View:
    """One photo of a lesion: placement, lighting and nuisances."""

    angle: float
    shift: tuple[float, float]
    zoom: float
    light_gain: float
    light_angle: float
    vignette_radius: float  # corners beyond this radius darken (large: no vignette)
    white_balance: np.ndarray  # (3,) per-channel gain
    noise_sigma: float
    texture: np.ndarray  # (4, 4, 3) low-frequency skin blotchiness, upsampled at render time
    hairs: np.ndarray  # (N, 7): three control points (x, y) and a darkness
    noise_seed: int


def _mix(a: tuple[float, ...], b: tuple[float, ...], t: float) -> np.ndarray:
    return np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t


def _blobs(rng: np.random.Generator, count: int, spread: float, sigma: tuple[float, float], colours, alpha):
    """``count`` colour patches at random points within ``spread`` of the centre (lesion units)."""
    if count <= 0:
        return np.zeros((0, 7))
    angle = rng.uniform(0, 2 * math.pi, count)
    dist = spread * np.sqrt(rng.uniform(0, 1, count))
    picks = np.asarray(colours, np.float64)[rng.integers(0, len(colours), count)]
    picks = picks + rng.normal(0, 8, picks.shape)
    return np.column_stack(
        [
            dist * np.cos(angle),
            dist * np.sin(angle),
            rng.uniform(*sigma, count),
            picks,
            rng.uniform(*alpha, count),
        ]
    )


def _class_features(name: str, rng: np.random.Generator, radius: float, colour: np.ndarray, centre_shade: float
                    ) -> tuple[np.ndarray, float, float, float]:
    """(colour patches, pigment network, ridges, centre shade) that mark the class (drawn in a fixed order: the
    dataset is a function of its seed)."""
    network = ridges = 0.0
    if name == "nevus":
        blobs = _blobs(rng, rng.integers(0, 3), 0.25 * radius, (0.2 * radius, 0.4 * radius),
                       [colour * 0.8, colour * 1.1], (0.2, 0.4))  # fmt: skip
        network = rng.uniform(0.05, 0.2)
    elif name == "melanoma":
        # Colour patches concentrated on one side: asymmetric colour, not just asymmetric shape.
        palette = [(55, 35, 30), (95, 58, 40), (105, 115, 140), (178, 78, 82), (226, 214, 208)]
        big = _blobs(
            rng, rng.integers(3, 7), 0.7 * radius, (0.15 * radius, 0.35 * radius), palette, (0.45, 0.9)
        )
        side = rng.uniform(0, 2 * math.pi)
        big[:, 0] += 0.25 * radius * math.cos(side)
        big[:, 1] += 0.25 * radius * math.sin(side)
        dots = _blobs(
            rng, rng.integers(8, 25), 0.95 * radius, (0.018, 0.035), [(45, 30, 28), (80, 50, 40)], (0.6, 0.9)
        )
        blobs = np.concatenate([big, dots])
        network = rng.uniform(0.0, 0.25)
        centre_shade = rng.uniform(-0.1, 0.2)
    elif name == "keratosis":
        milia = _blobs(rng, rng.integers(5, 16), 0.85 * radius, (0.02, 0.035), [(236, 228, 200)], (0.6, 0.9))
        comedo = _blobs(rng, rng.integers(3, 11), 0.85 * radius, (0.02, 0.035), [(60, 45, 35)], (0.5, 0.85))
        blobs = np.concatenate([milia, comedo])
        ridges = rng.uniform(0.04, 0.12)
    else:  # vascular
        lacunae = [(150, 28, 48), (110, 22, 62), (170, 45, 60)]
        blobs = _blobs(
            rng, rng.integers(4, 10), 0.6 * radius, (0.12 * radius, 0.24 * radius), lacunae, (0.6, 0.9)
        )
    return blobs, network, ridges, centre_shade


def _sample_lesion(label: int, rng: np.random.Generator) -> _Lesion:
    name = SYNTHETIC_CLASSES[label]
    style = _STYLES[name]
    radius = rng.uniform(*style.radius)
    k = _HARMONICS
    amplitudes = np.where(
        k <= 3,
        rng.uniform(*style.asymmetry, k.size),
        rng.uniform(*style.irregularity, k.size) * np.sqrt(4.0 / k) * rng.uniform(0.3, 1.0, k.size),
    )
    colour = _mix(style.colour_dark, style.colour_light, rng.uniform()) + rng.normal(0, 6, 3)
    centre_shade = rng.uniform(-0.05, 0.12)
    blobs, network, ridges, centre_shade = _class_features(name, rng, radius, colour, centre_shade)
    return _Lesion(
        label=label,
        radius=radius,
        amplitudes=amplitudes,
        phases=rng.uniform(0, 2 * math.pi, k.size),
        softness=rng.uniform(*style.softness) * radius,
        softness_variation=rng.uniform(*style.softness_variation),
        softness_phase=rng.uniform(0, 2 * math.pi),
        colour=colour,
        centre_shade=centre_shade,
        blobs=blobs,
        network=network,
        network_freq=rng.uniform(22, 32),
        network_phase=(rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)),
        ridges=ridges,
        ridge_freq=rng.uniform(22, 45),
        ridge_angle=rng.uniform(0, math.pi),
        skin=_SKIN_TONES[rng.integers(0, len(_SKIN_TONES))] + rng.normal(0, 6, 3),
    )


def _sample_view(rng: np.random.Generator) -> _View:
    hair_count = 0 if rng.uniform() < 0.5 else int(rng.integers(1, 5))
    # Hairs cross the field: two ends near or beyond the border, the middle bent a little off the chord.
    ends = rng.uniform(-1.2, 1.2, (hair_count, 4))
    bend = (ends[:, :2] + ends[:, 2:]) / 2 + rng.normal(0, 0.15, (hair_count, 2))
    hairs = np.column_stack([ends[:, :2], bend, ends[:, 2:], rng.uniform(25, 80, hair_count)])
    return _View(
        angle=rng.uniform(0, 2 * math.pi),
        shift=(rng.normal(0, 0.07), rng.normal(0, 0.07)),
        zoom=rng.uniform(0.85, 1.15),
        light_gain=rng.uniform(0.0, 0.18),
        light_angle=rng.uniform(0, 2 * math.pi),
        vignette_radius=rng.uniform(1.05, 1.4) if rng.uniform() < 0.4 else 10.0,
        white_balance=1.0 + rng.normal(0, 0.03, 3),
        noise_sigma=rng.uniform(2.0, 6.0),
        texture=rng.normal(0, 7, (4, 4, 3)),
        hairs=hairs,
        noise_seed=int(rng.integers(0, 2**31)),
    )


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y down), float32 (read-only, shared)."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    x, y = np.meshgrid(axis, axis)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _render(lesion: _Lesion, view: _View, size: int) -> Image.Image:
    """Rasterise one view of a lesion to a ``size`` x ``size`` RGB image."""
    x, y = _grid(size)
    u, v = _lesion_coordinates(x, y, view)
    rho = np.hypot(u, v)
    mask, edge = _lesion_mask(lesion, view, size, rho, np.arctan2(v, u))
    colour = _lesion_colour(lesion, view, size, u, v, rho, edge)
    # Skin: the patient's tone with smooth blotchiness (a 4x4 grid of offsets upsampled bicubically, stored
    # around 128 in an 8-bit image).
    grid = Image.fromarray(np.clip(np.rint(view.texture + 128.0), 0, 255).astype(np.uint8), "RGB")
    skin = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=F32) + (
        lesion.skin - 128.0
    ).astype(F32)
    out = _photograph(skin + mask[..., None] * (colour - skin), view, x, y)
    _draw_hairs(out, view, size)
    return out


# float32 throughout: the whole dataset has to render in seconds, and 8-bit output needs no more.
F32 = np.float32


def _lesion_coordinates(x: np.ndarray, y: np.ndarray, view: _View) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates -> lesion coordinates (undo the view's shift, zoom and rotation)."""
    c, s = math.cos(view.angle), math.sin(view.angle)
    px, py = (x - F32(view.shift[0])) / F32(view.zoom), (y - F32(view.shift[1])) / F32(view.zoom)
    return F32(c) * px + F32(s) * py, F32(-s) * px + F32(c) * py


def _lesion_mask(lesion: _Lesion, view: _View, size: int, rho: np.ndarray, theta: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(the soft lesion mask, the border radius per pixel).

    A radius that varies with the angle (low harmonics: asymmetry; high: ragged border). Radius and blur are
    smooth functions of the angle, so they are tabulated once per image and looked up per pixel (half-degree
    steps are well below a pixel along the border)."""
    table = np.linspace(-math.pi, math.pi, _ANGLE_TABLE)
    slot = np.rint((theta + F32(math.pi)) * F32((_ANGLE_TABLE - 1) / (2 * math.pi))).astype(np.intp)
    wobble = np.cos(table[:, None] * _HARMONICS + lesion.phases) @ lesion.amplitudes
    edge = (lesion.radius * np.maximum(1.0 + wobble, 0.3)).astype(F32)[slot]
    pixel = 2.0 / size / view.zoom
    blur = lesion.softness * (1.0 + lesion.softness_variation * np.cos(table - lesion.softness_phase))
    soft = np.maximum(blur, 0.6 * pixel).astype(F32)[slot]
    return F32(1.0) / (F32(1.0) + np.exp(np.clip((rho - edge) / soft, -50, 50))), edge


def _lesion_colour(lesion: _Lesion, view: _View, size: int, u: np.ndarray, v: np.ndarray, rho: np.ndarray,
                   edge: np.ndarray) -> np.ndarray:
    """Lesion colour: base, shaded towards the centre, then pigment network, ridges and colour patches."""
    shade = F32(1.0) - F32(lesion.centre_shade) * np.clip(F32(1.0) - rho / edge, 0.0, 1.0)
    if lesion.network:
        # A pigment network: dark lines along a slightly warped grid, light holes between them.
        f = F32(lesion.network_freq / 2)
        gu = np.abs(np.sin(f * u + F32(lesion.network_phase[0]) + F32(0.8) * np.sin(F32(7.0) * v)))
        gv = np.abs(np.sin(f * v + F32(lesion.network_phase[1]) + F32(0.8) * np.sin(F32(7.0) * u)))
        shade *= F32(1.0) - F32(lesion.network) * np.clip(F32(1.0) - np.minimum(gu, gv) / F32(0.35), 0.0, 1.0)
    if lesion.ridges:
        ca, sa = F32(math.cos(lesion.ridge_angle)), F32(math.sin(lesion.ridge_angle))
        along, across = u * ca + v * sa, v * ca - u * sa
        shade *= F32(1.0) + F32(lesion.ridges) * np.sin(
            F32(lesion.ridge_freq) * along + 2.5 * np.sin(9.0 * across)
        )
    colour = lesion.colour.astype(F32) * shade[..., None]
    c, s = math.cos(view.angle), math.sin(view.angle)
    for bx, by, sigma, r, g, b, alpha in lesion.blobs:
        # Only the pixels within 3 sigma matter: most blobs are small dots, so update just their window.
        ix = ((c * bx - s * by) * view.zoom + view.shift[0] + 1.0) * size / 2.0
        iy = ((s * bx + c * by) * view.zoom + view.shift[1] + 1.0) * size / 2.0
        reach = 3.0 * sigma * view.zoom * size / 2.0 + 1.0
        x0, x1 = max(0, int(ix - reach)), min(size, int(ix + reach) + 1)
        y0, y1 = max(0, int(iy - reach)), min(size, int(iy + reach) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        window = (slice(y0, y1), slice(x0, x1))
        d2 = (u[window] - F32(bx)) ** 2 + (v[window] - F32(by)) ** 2
        weight = F32(alpha) * np.exp(d2 * F32(-0.5 / (sigma * sigma)))
        colour[window] += weight[..., None] * (np.array([r, g, b], F32) - colour[window])
    return colour


def _photograph(img: np.ndarray, view: _View, x: np.ndarray, y: np.ndarray) -> Image.Image:
    """The photo of the scene: lighting gradient, dermatoscope vignette, white balance and sensor noise."""
    light = F32(1.0) + F32(view.light_gain) * (
        x * F32(math.cos(view.light_angle)) + y * F32(math.sin(view.light_angle))
    )
    light *= np.clip(F32(1.0) - (np.hypot(x, y) - F32(view.vignette_radius)) / F32(0.15), 0.0, 1.0)
    img *= light[..., None]
    img *= view.white_balance.astype(F32)
    noise = np.random.default_rng(view.noise_seed).standard_normal(img.shape, dtype=F32)
    img += F32(view.noise_sigma) * noise
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _draw_hairs(out: Image.Image, view: _View, size: int) -> None:
    if not len(view.hairs):
        return
    draw = ImageDraw.Draw(out)
    width = max(1, round(size / 110))
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for x0, y0, x1, y1, x2, y2, dark in view.hairs:
        # A quadratic Bezier curve: hairs are gently bent strands crossing the field.
        pts = (1 - t) ** 2 * (x0, y0) + 2 * (1 - t) * t * (x1, y1) + t**2 * (x2, y2)
        pts = (pts + 1.0) * (size / 2.0)
        colour_rgb = (int(dark), int(dark * 0.8), int(dark * 0.7))
        draw.line([tuple(p) for p in pts], fill=colour_rgb, width=width)


def render_lesion(label: int, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A new random lesion of class ``SYNTHETIC_CLASSES[label]``, photographed once, as a ``size`` x ``size``
    RGB image. Deterministic for a given generator state."""
    if not 0 <= label < len(SYNTHETIC_CLASSES):
        raise ValueError(f"label must be in [0, {len(SYNTHETIC_CLASSES)}), got {label}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    return _render(_sample_lesion(label, rng), _sample_view(rng), size)


def _jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _lesion_images(job: tuple[int, int, int, int, int, int]) -> list[tuple[str, bytes]]:
    """Render and encode all views of one lesion: ((file name, JPEG bytes), ...)."""
    seed, label, index, global_index, views, size = job
    # One generator per lesion, keyed by (seed, class, index): the output does not depend on thread scheduling
    # or on how many images other classes have.
    rng = np.random.default_rng([seed, label, index])
    lesion = _sample_lesion(label, rng)
    lesion_id = f"lesion{global_index:05d}"
    return [
        (f"{lesion_id}_{view}.jpg", _jpeg(_render(lesion, _sample_view(rng), size))) for view in range(views)
    ]


def generate(
    out_uri: str, images_per_class: int = 150, image_size: int = 96, seed: int = 0, views_per_lesion: int = 2
) -> list[tuple[str, str, str]]:
    """Write ``images_per_class`` JPEGs per class to ``<out_uri>/<class>/<lesion_id>_<view>.jpg`` (local path
    or s3:// URI) and return ``(image_uri, label_name, group_id)`` per image, grouped by class then lesion.

    Each lesion is photographed ``views_per_lesion`` times (the last lesion of a class may have fewer views so
    the count is exact); its views share ``group_id`` (the lesion id). The same arguments give the same files.
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if views_per_lesion < 1:
        raise ValueError(f"views_per_lesion must be >= 1, got {views_per_lesion}")
    lesions_per_class = math.ceil(images_per_class / views_per_lesion)
    jobs = []
    for label in range(len(SYNTHETIC_CLASSES)):
        for index in range(lesions_per_class):
            views = min(views_per_lesion, images_per_class - index * views_per_lesion)
            jobs.append((seed, label, index, label * lesions_per_class + index, views, image_size))

    def make_and_write(job: tuple[int, int, int, int, int, int]) -> list[tuple[str, str, str]]:
        name = SYNTHETIC_CLASSES[job[1]]
        rows = []
        for file_name, data in _lesion_images(job):
            uri = storage.write_bytes(storage.join(out_uri, name, file_name), data)
            rows.append((uri, name, file_name.rsplit("_", 1)[0]))
        return rows

    # Threads overlap the writes (fsync locally, round trips on S3) with numpy and JPEG work, which release
    # the GIL for most of their time.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [row for rows in pool.map(make_and_write, jobs) for row in rows]
