"""Class trees: a model trained on fine classes reports coarse probabilities by summing children (Esteva 2017).

The trees live in ``taxonomies.yaml`` beside this file (one per dataset family). A checkpoint stores the tree
restricted to its classes, so evaluation and prediction never depend on the dataset name again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np
import yaml

MALIGNANT = "malignant"


@functools.cache
def _families() -> dict[str, dict]:
    return yaml.safe_load(resources.files("dermray").joinpath("taxonomies.yaml").read_text())


def taxonomy_names() -> list[str]:
    return list(_families())


def taxonomy_tree(name: str | None, classes: list[str]) -> dict[str, list[str]] | None:
    """The tree restricted to ``classes`` (classes outside it are left out), or None when there is none."""
    family = _families().get(name or "")
    if family is None:
        return None
    return {coarse: [c for c in fine if c in classes] for coarse, fine in family["tree"].items()}


def melanoma_class(name: str | None, classes: list[str]) -> str | None:
    """The fine class whose one-vs-rest AUC is the melanoma AUC, when the dataset has one."""
    fine = (_families().get(name or "") or {}).get("melanoma")
    return fine if fine in classes else None


def infer_taxonomy(classes: list[str]) -> str | None:
    """The known tree whose fine classes cover every class of a dataset (e.g. a generic CSV of dx codes)."""
    for name, family in _families().items():
        leaves = {leaf for fine in family["tree"].values() for leaf in fine}
        if set(classes) <= leaves:
            return name
    return None


def coarse_probabilities(probs: np.ndarray, classes: list[str], tree: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """{coarse class: P(coarse) per row}, each the sum of its children's probabilities (Esteva's inference)."""
    index = {name: i for i, name in enumerate(classes)}
    return {coarse: probs[:, [index[c] for c in fine if c in index]].sum(axis=1) for coarse, fine in tree.items()}


@dataclass(frozen=True)
class IsicFormat:
    """An ISIC challenge's submission layout for a model: the official columns in order, and per column the index
    of the model class it takes its probability from (None: a class the model lacks, written as 0)."""

    challenge: str
    columns: tuple[str, ...]
    sources: tuple[int | None, ...]


def isic_format(classes: list[str]) -> IsicFormat | None:
    """The ISIC submission layout whose classes are exactly the model's (optional columns aside), or None.

    Exact, not a subset: a model with a class that has no official column, or missing a required one, cannot make
    a submission the official scorer would accept."""
    for family in _families().values():
        spec = family.get("isic_submission")
        if not spec:
            continue
        mapped = dict(spec["columns"])
        required = set(mapped.values()) - set(spec.get("optional") or [])
        if required <= set(classes) <= set(mapped.values()):
            return IsicFormat(spec["challenge"], tuple(mapped),
                              tuple(classes.index(c) if c in classes else None for c in mapped.values()))
    return None
