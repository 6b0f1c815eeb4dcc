"""Class trees: a model trained on fine classes reports coarse probabilities by summing children (Esteva 2017)."""

from __future__ import annotations

TAXONOMIES: dict[str, dict[str, list[str]]] = {
    # HAM10000 / ISIC 2018 / DermaMNIST dx codes.
    "ham10000": {"malignant": ["akiec", "bcc", "mel"], "benign": ["bkl", "df", "nv", "vasc"]},
    "isic2019": {"malignant": ["ak", "bcc", "mel", "scc"], "benign": ["bkl", "df", "nv", "vasc"]},
    "isic2020": {"malignant": ["malignant"], "benign": ["benign"]},
    "synthetic": {"malignant": ["melanoma"], "benign": ["nevus", "keratosis", "vascular"]},
}


def taxonomy_tree(name: str | None, classes: list[str]) -> dict[str, list[str]] | None:
    """The tree restricted to ``classes`` (classes outside it are left out), or None when there is none."""
    tree = TAXONOMIES.get(name or "")
    if tree is None:
        return None
    return {coarse: [c for c in fine if c in classes] for coarse, fine in tree.items()}


def infer_taxonomy(classes: list[str]) -> str | None:
    """The known tree whose fine classes cover every class of a dataset (e.g. a generic CSV of dx codes)."""
    for name, tree in TAXONOMIES.items():
        leaves = {leaf for fine in tree.values() for leaf in fine}
        if set(classes) <= leaves:
            return name
    return None
