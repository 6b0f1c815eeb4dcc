"""dermray.data.synthetic: the embedded dataset is complete, decodable, grouped by lesion, deterministic and
learnable."""

from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dermray.data import synthetic
from dermray.data.imaging import decode_rgb, probe_image
from dermray.data.synthetic import SYNTHETIC_CLASSES, generate, render_lesion


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_counts_layout_and_decoding(tmp_path):
    rows = generate(str(tmp_path / "syn"), images_per_class=7, image_size=48, seed=3, views_per_lesion=2)
    assert len(rows) == 7 * len(SYNTHETIC_CLASSES)
    assert Counter(label for _, label, _ in rows) == {name: 7 for name in SYNTHETIC_CLASSES}
    for uri, label, group in rows:
        assert os.path.dirname(uri) == str(tmp_path / "syn" / label)
        name = os.path.basename(uri)
        assert name.endswith(".jpg") and name.startswith(group + "_")
        data = open(uri, "rb").read()
        assert probe_image(data).width == 48 and probe_image(data).height == 48
        img = decode_rgb(data)
        assert img.mode == "RGB" and img.size == (48, 48)
    # Nothing else is written (no temporary files left behind).
    assert len(files_under(tmp_path / "syn")) == len(rows)


def test_views_of_a_lesion_share_a_group(tmp_path):
    rows = generate(str(tmp_path / "syn"), images_per_class=9, image_size=32, seed=0, views_per_lesion=3)
    groups: dict[str, set[str]] = {}
    for _, label, group in rows:
        groups.setdefault(group, set()).add(label)
    sizes = Counter(group for _, _, group in rows)
    assert set(sizes.values()) == {3}  # 9 images per class = 3 lesions x 3 views
    assert len(groups) == 3 * len(SYNTHETIC_CLASSES)
    assert all(len(labels) == 1 for labels in groups.values())  # a lesion has one class
    # Views of one lesion are different pictures.
    first = [uri for uri, _, group in rows if group == rows[0][2]]
    pixels = [np.asarray(decode_rgb(open(uri, "rb").read()), dtype=int) for uri in first]
    assert np.abs(pixels[0] - pixels[1]).mean() > 3


def test_uneven_views_still_give_exact_counts(tmp_path):
    rows = generate(str(tmp_path / "syn"), images_per_class=5, image_size=32, seed=0, views_per_lesion=2)
    assert Counter(label for _, label, _ in rows) == {name: 5 for name in SYNTHETIC_CLASSES}
    assert sorted(Counter(group for _, _, group in rows).values()) == [1] * 4 + [2] * 8


def test_deterministic_for_a_seed(tmp_path):
    a = generate(str(tmp_path / "a"), images_per_class=4, image_size=40, seed=11)
    b = generate(str(tmp_path / "b"), images_per_class=4, image_size=40, seed=11)
    c = generate(str(tmp_path / "c"), images_per_class=4, image_size=40, seed=12)
    assert [(os.path.relpath(u, tmp_path / "a"), lab, g) for u, lab, g in a] == [
        (os.path.relpath(u, tmp_path / "b"), lab, g) for u, lab, g in b
    ]
    bytes_a = [open(u, "rb").read() for u, _, _ in a]
    assert bytes_a == [open(u, "rb").read() for u, _, _ in b]
    assert bytes_a != [open(u, "rb").read() for u, _, _ in c]
    # A class's images do not depend on how many images the run makes in total.
    more = generate(str(tmp_path / "d"), images_per_class=6, image_size=40, seed=11)
    assert open(a[0][0], "rb").read() == open(more[0][0], "rb").read()


def test_render_lesion():
    rng = np.random.default_rng(0)
    img = render_lesion(1, rng, size=80)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (80, 80)
    assert np.array_equal(
        np.asarray(render_lesion(2, np.random.default_rng(5))),
        np.asarray(render_lesion(2, np.random.default_rng(5))),
    )
    with pytest.raises(ValueError):
        render_lesion(len(SYNTHETIC_CLASSES), rng)


def test_invalid_arguments(tmp_path):
    for kwargs in ({"images_per_class": 0}, {"image_size": 4}, {"views_per_lesion": 0}):
        with pytest.raises(ValueError):
            generate(str(tmp_path / "x"), **kwargs)


def test_default_dataset_is_fast(tmp_path):
    # The embedded default (150 per class at 96 px) is made on first use; it has to take seconds, not minutes.
    start = time.perf_counter()
    rows = generate(str(tmp_path / "syn"), images_per_class=150, image_size=96, seed=0)
    elapsed = time.perf_counter() - start
    assert len(rows) == 600
    assert elapsed < 20, f"generating 600 images took {elapsed:.1f}s"


def features(img: Image.Image) -> np.ndarray:
    """Simple statistics: per-channel mean and std, and an 8x8 grey thumbnail."""
    arr = np.asarray(img, dtype=np.float64) / 255.0
    thumb = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64) / 255.0
    return np.concatenate([arr.mean(axis=(0, 1)), arr.std(axis=(0, 1)), thumb.ravel()])


def test_classes_are_separable_by_simple_statistics(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = generate(str(tmp_path / "syn"), images_per_class=80, image_size=64, seed=1)
    x = np.stack([features(decode_rgb(open(uri, "rb").read())) for uri, _, _ in rows])
    y = np.array([SYNTHETIC_CLASSES.index(label) for _, label, _ in rows])
    groups = np.array([group for _, _, group in rows])
    # Held-out lesions (not just held-out views): a grouped split, as training would use.
    unique = np.unique(groups)
    held_out = set(np.random.default_rng(0).choice(unique, size=len(unique) // 4, replace=False))
    test = np.array([g in held_out for g in groups])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x[~test], y[~test])
    accuracy = float((model.predict(x[test]) == y[test]).mean())
    assert accuracy > 0.6, f"held-out accuracy {accuracy:.2f} (chance 0.25)"


def test_classes_overlap_in_mean_colour():
    # Not trivially separable: a nearest-centroid rule on the mean colour alone must make real mistakes.
    rng = np.random.default_rng(2)
    means = {
        label: np.stack(
            [np.asarray(render_lesion(label, rng, 48), float).mean(axis=(0, 1)) for _ in range(40)]
        )
        for label in range(len(SYNTHETIC_CLASSES))
    }
    centroids = np.stack([m.mean(axis=0) for m in means.values()])
    correct = sum(
        int(np.argmin(np.linalg.norm(centroids - colour, axis=1)) == label)
        for label, m in means.items()
        for colour in m
    )
    assert correct / (40 * len(SYNTHETIC_CLASSES)) < 0.9


def test_module_exports():
    assert len(synthetic.SYNTHETIC_CLASSES) == 4 and len(set(synthetic.SYNTHETIC_CLASSES)) == 4
