"""Measure staging's duplicate detection on the real data in ../shared/data (figures for docs/duplicates.md).

    .venv/bin/python dev/measure_duplicates.py [--sample 500]

Hashes are computed exactly as staging does (bytes -> dermray.data.imaging.probe_thumbnail -> perceptual_hash):
* recall on synthetic re-encodings of real ham10000-300 photos (JPEG quality 70/90, resized down and up);
* recall on DermaMNIST's 28 px copies of the same photos, paired to ham10000-300 by pixel nearest neighbour
  (the npz carries no image id, so the pairing itself is measured and only unambiguous pairs are used);
* false positives: pairs of different lesions among the 8,010 ham10000-300 photos within the threshold
  (same-lesion pairs are reported apart: several photos of one lesion are not copies of one photo);
* the ISIC 2020 duplicates list: how many of its images exist in the data folder.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dermray.data.duplicates import NEAR_THRESHOLD, _packed, content_hash, near_pairs, perceptual_hash  # noqa: E402
from dermray.data.imaging import probe_thumbnail  # noqa: E402

DATA = REPO.parent / "shared" / "data"
THRESHOLDS = (0, 8, 16, 24, 32, 34, 36, 40, 48, 64)


def phash_of_bytes(data: bytes) -> str:
    """The perceptual hash staging computes for these file bytes."""
    _, img = probe_thumbnail(data)
    return perceptual_hash(img)


def jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def bits(a: list[str], b: list[str]) -> np.ndarray:
    """Hamming distances between two equally long lists of hex perceptual hashes."""
    return np.bitwise_count(_packed(a) ^ _packed(b)).sum(axis=1)


def recall_line(name: str, distances: np.ndarray) -> str:
    cells = " ".join(f"{(distances <= t).mean():6.3f}" for t in THRESHOLDS)
    return f"| {name:<34} | {len(distances):5d} | {cells} | median {np.median(distances):.0f}, max {distances.max()} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=500, help="photos re-encoded for the synthetic recall")
    args = parser.parse_args()
    started = time.monotonic()
    ham = pd.read_csv(DATA / "ham10000-300" / "labels.csv")
    files = [DATA / "ham10000-300" / f for f in ham["file"]]
    raw = [p.read_bytes() for p in files]
    t0 = time.monotonic()
    hashes = [phash_of_bytes(b) for b in raw]
    per_image_ms = 1000 * (time.monotonic() - t0) / len(raw)
    digests = [content_hash(b) for b in raw]
    print(f"ham10000-300: {len(raw)} photos, {ham['lesion_id'].nunique()} lesions; decode+phash "
          f"{per_image_ms:.2f} ms/photo; byte-identical files: {len(digests) - len(set(digests))}; "
          f"staging threshold {NEAR_THRESHOLD} of 256 bits")

    # ---- false positives: every pair of the 8,010 photos.
    lesion = pd.factorize(ham["lesion_id"])[0]
    cross = np.zeros(257, np.int64)
    same = np.zeros(257, np.int64)
    matched_cross: dict[int, set[int]] = {t: set() for t in THRESHOLDS}
    u = _packed(hashes)
    t0 = time.monotonic()
    for i in range(len(u) - 1):
        d = np.bitwise_count(u[i] ^ u[i + 1:]).sum(axis=1)
        same_lesion = lesion[i + 1:] == lesion[i]
        cross += np.bincount(d[~same_lesion], minlength=257)
        same += np.bincount(d[same_lesion], minlength=257)
        for t in THRESHOLDS:
            hits = np.flatnonzero((d <= t) & ~same_lesion)
            if hits.size:
                matched_cross[t].add(i)
                matched_cross[t].update((hits + i + 1).tolist())
    pairs_seconds = time.monotonic() - t0
    n_cross, n_same = int(cross.sum()), int(same.sum())
    print(f"\npairs: {n_cross} of different lesions, {n_same} of the same lesion "
          f"(all-pairs loop {pairs_seconds:.1f} s); "
          f"smallest cross-lesion distance {int(np.flatnonzero(cross)[0])}")
    print("| threshold | cross-lesion pairs within (FP) | FP rate per pair | photos with a cross-lesion match "
          "| same-lesion pairs within |")
    print("|---|---|---|---|---|")
    for t in THRESHOLDS:
        fp = int(cross[: t + 1].sum())
        print(f"| {t} | {fp} | {fp / n_cross:.2e} | {len(matched_cross[t])} ({len(matched_cross[t]) / len(u):.2%}) "
              f"| {int(same[: t + 1].sum())} of {n_same} |")

    print("\ncross-lesion pairs within 44 bits (to inspect by eye: a true copy under two lesion ids is a hit):")
    for a, b, d in sorted(near_pairs(hashes, 44), key=lambda p: p[2]):
        if lesion[a] != lesion[b]:
            print(f"  {d:3d}  {ham['image_id'][a]} ({ham['dx'][a]})  {ham['image_id'][b]} ({ham['dx'][b]})")

    # ---- recall on synthetic re-encodings of real photos.
    rng = np.random.default_rng(0)
    pick = rng.choice(len(raw), size=min(args.sample, len(raw)), replace=False)
    variants = {
        "JPEG q90 re-encode (300x225)": lambda im: jpeg(im, 90),
        "JPEG q70 re-encode (300x225)": lambda im: jpeg(im, 70),
        "resized to 150x112, q85": lambda im: jpeg(im.resize((150, 112), Image.BICUBIC), 85),
        "resized to 75x56, q70": lambda im: jpeg(im.resize((75, 56), Image.BICUBIC), 70),
        "upscaled to 600x450, q90": lambda im: jpeg(im.resize((600, 450), Image.BICUBIC), 90),
        "PNG (lossless), 300x225": lambda im: _png(im),
    }
    print(f"\nrecall on re-encodings of {len(pick)} random ham10000-300 photos (seed 0):")
    print("| variant | pairs | " + " | ".join(f"<={t}" for t in THRESHOLDS) + " | distance |")
    print("|---|---|" + "---|" * len(THRESHOLDS) + "---|")
    for name, make in variants.items():
        distances = []
        for i in pick:
            with Image.open(io.BytesIO(raw[i])) as im:
                copy = make(im.convert("RGB"))
            distances.append(int(bits([phash_of_bytes(copy)], [hashes[i]])[0]))
        print(recall_line(name, np.array(distances)))

    # ---- DermaMNIST: the same photos at 28 px (train + val = these 8,010 photos).
    npz = np.load(DATA / "dermamnist" / "dermamnist_28_trainval.npz")
    small = np.concatenate([npz["train_images"], npz["val_images"]])
    small_labels = np.concatenate([npz["train_labels"][:, 0], npz["val_labels"][:, 0]])
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    ham_labels = np.array([classes.index(d) for d in ham["dx"]])
    thumbs = np.stack([np.asarray(Image.open(p).convert("RGB").resize((28, 28), Image.BOX), np.float32)
                       for p in files]).reshape(len(files), -1)
    flat = small.reshape(len(small), -1).astype(np.float32)
    pairs, ratios = [], []
    for label in range(len(classes)):
        a, b = np.flatnonzero(small_labels == label), np.flatnonzero(ham_labels == label)
        d2 = (flat[a] ** 2).sum(1)[:, None] + (thumbs[b] ** 2).sum(1)[None, :] - 2 * flat[a] @ thumbs[b].T
        order = np.argsort(d2, axis=1)[:, :2]
        best = d2[np.arange(len(a)), order[:, 0]]
        second = d2[np.arange(len(a)), order[:, 1]]
        for k in range(len(a)):
            ratio = float(np.sqrt(max(best[k], 0) / max(second[k], 1e-9)))
            ratios.append(ratio)
            pairs.append((int(a[k]), int(b[order[k, 0]]), ratio))
    clear = [(s, h) for s, h, r in pairs if r < 0.5]
    ham_used = len({h for _, h in clear})
    print(f"\nDermaMNIST pairing by pixel nearest neighbour (same label, 28 px box-downscaled ham10000-300): "
          f"{len(clear)} of {len(pairs)} unambiguous (distance ratio best/second < 0.5), {ham_used} distinct "
          f"ham10000-300 photos; median ratio {np.median(ratios):.2f}")
    small_hash = [phash_of_bytes(_png(Image.fromarray(small[s]))) for s, _ in clear]
    print("| variant | pairs | " + " | ".join(f"<={t}" for t in THRESHOLDS) + " | distance |")
    print(recall_line("DermaMNIST 28 px vs ham10000-300", bits(small_hash, [hashes[h] for _, h in clear])))

    # ---- ISIC 2020's list of duplicate pairs.
    dup = pd.read_csv(DATA / "metadata" / "ISIC_2020_Training_Duplicates.csv")
    present = {p.stem for p in DATA.glob("*/images/*")} | {p.stem for p in DATA.glob("*/*.jpg")}
    listed = set(dup["image_name_1"]) | set(dup["image_name_2"])
    print(f"\nISIC 2020 duplicates list: {len(dup)} pairs, {len(listed)} images; present in {DATA}: "
          f"{len(listed & present)}")
    print(f"\ntotal {time.monotonic() - started:.0f} s")


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
