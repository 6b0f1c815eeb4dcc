"""Grouped, stratified, seeded train/val/test splits that stay stable as a dataset grows.

Rules, in order of precedence:
1. an image already in the previous manifest keeps its split;
2. an image of a group (lesion or patient) already seen keeps that group's split, so no group is ever on two
   sides;
3. new groups are assigned one at a time, in a seeded hash order, to the split whose share of the group's class
   (its most common label) is furthest below its target, weighted by image count. That is stratified by label,
   deterministic for a seed, and never moves an old image.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {values}")

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _hash_order(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def assign_splits(
    image_uris: list[str],
    labels: list[int],
    groups: list[str],
    fractions: SplitFractions = SplitFractions(),
    seed: int = 0,
    previous: dict[str, str] | None = None,
    previous_groups: dict[str, str] | None = None,
) -> list[str]:
    """The split of every image. ``previous`` maps image URI -> split and ``previous_groups`` group -> split
    from an earlier manifest of the same dataset."""
    previous = previous or {}
    group_split: dict[str, str] = dict(previous_groups or {})
    for uri, group in zip(image_uris, groups):
        if uri in previous:
            group_split.setdefault(group, previous[uri])

    # Counts per (stratum, split) of what is already placed, and the images of each new group.
    group_labels: dict[str, Counter] = defaultdict(Counter)
    for label, group in zip(labels, groups):
        group_labels[group][label] += 1

    def stratum(group: str) -> int:
        counts = group_labels[group]
        return min(counts, key=lambda label: (-counts[label], label))

    placed: dict[int, Counter] = defaultdict(Counter)
    stratum_total: Counter = Counter()
    for group, counts in group_labels.items():
        stratum_total[stratum(group)] += sum(counts.values())
        if group in group_split:
            placed[stratum(group)][group_split[group]] += sum(counts.values())

    targets = fractions.as_dict()
    new_groups = sorted((g for g in group_labels if g not in group_split), key=lambda g: _hash_order(seed, g))
    for group in new_groups:
        s = stratum(group)
        total = stratum_total[s]
        deficits = {name: targets[name] * total - placed[s][name] for name in SPLITS if targets[name] > 0}
        # Largest deficit wins; ties go to train first (SPLITS order), so a rare class's first group trains.
        best = max(deficits, key=lambda name: (deficits[name], -SPLITS.index(name)))
        group_split[group] = best
        placed[s][best] += sum(group_labels[group].values())

    return [previous.get(uri, group_split[group]) for uri, group in zip(image_uris, groups)]
