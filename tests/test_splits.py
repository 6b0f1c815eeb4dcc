"""Grouped, stratified, stable splits, proven on the real HAM10000 metadata (7,470 lesions, 10,015 images)."""

from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dermray.data.manifest import Manifest
from dermray.data.splits import SplitFractions, assign_splits
from tests.conftest import data_path


@pytest.fixture(scope="module")
def ham():
    frame = pd.read_csv(data_path("metadata", "HAM10000_metadata.csv"))
    classes = sorted(frame["dx"].unique())
    return (
        list(frame["image_id"]),
        [classes.index(d) for d in frame["dx"]],
        list(frame["lesion_id"]),
    )


def _groups_on_one_side(groups, splits):
    sides = defaultdict(set)
    for group, split in zip(groups, splits):
        sides[group].add(split)
    return all(len(s) == 1 for s in sides.values())


def test_no_lesion_on_two_sides_and_fractions_hold_per_class(ham):
    images, labels, groups = ham
    splits = assign_splits(images, labels, groups, SplitFractions(0.7, 0.15, 0.15), seed=0)
    assert _groups_on_one_side(groups, splits)
    for label in set(labels):
        counts = Counter(s for s, lab in zip(splits, labels) if lab == label)
        total = sum(counts.values())
        # Stratified: every class within a few points of 70/15/15 (groups are indivisible, so not exact).
        assert abs(counts["train"] / total - 0.70) < 0.04, (label, counts)
        assert abs(counts["val"] / total - 0.15) < 0.04, (label, counts)
        assert abs(counts["test"] / total - 0.15) < 0.04, (label, counts)


def test_seeded_and_deterministic(ham):
    images, labels, groups = ham
    first = assign_splits(images, labels, groups, seed=3)
    assert first == assign_splits(images, labels, groups, seed=3)
    assert first != assign_splits(images, labels, groups, seed=4)


def test_restaging_a_superset_keeps_old_assignments(ham):
    images, labels, groups = ham
    rng = np.random.default_rng(0)
    old = sorted(rng.choice(len(images), size=int(0.8 * len(images)), replace=False))
    old_splits = assign_splits([images[i] for i in old], [labels[i] for i in old], [groups[i] for i in old])
    previous = dict(zip([images[i] for i in old], old_splits))
    previous_groups = dict(zip([groups[i] for i in old], old_splits))

    new_splits = assign_splits(images, labels, groups, previous=previous, previous_groups=previous_groups)
    by_image = dict(zip(images, new_splits))
    assert all(by_image[image] == split for image, split in previous.items())
    # New images of lesions seen before join their lesion's split; nothing straddles.
    for image, group, split in zip(images, groups, new_splits):
        if image not in previous and group in previous_groups:
            assert split == previous_groups[group]
    assert _groups_on_one_side(groups, new_splits)
    # The new groups still bring the whole towards the target fractions.
    share = Counter(new_splits)["train"] / len(images)
    assert abs(share - 0.7) < 0.03


def test_rare_class_first_group_goes_to_train():
    splits = assign_splits(["a", "b"], [0, 1], ["g1", "g2"])
    assert splits == ["train", "train"]


def test_fractions_are_validated():
    with pytest.raises(ValueError):
        SplitFractions(0.8, 0.3, 0.1)


def test_a_split_name_joined_by_plus_is_the_union_of_those_splits():
    """data.train_split=train+test trains on both (a recipe whose test set is another collection)."""
    table = pa.table({"image_uri": [f"i{n}" for n in range(6)], "label": pa.array([0, 1, 0, 1, 0, 1], pa.int32()),
                      "split": ["train", "val", "test", "train", "test", "val"]})
    manifest = Manifest(table, ["a", "b"], "csv")
    assert manifest.split("train+test")["image_uri"].to_pylist() == ["i0", "i2", "i3", "i4"]
    assert manifest.split("train")["image_uri"].to_pylist() == ["i0", "i3"]
    assert manifest.class_counts("train+test") == {"a": 3, "b": 1}
    assert manifest.split("train+missing").num_rows == 2
