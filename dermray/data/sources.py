"""Dataset sources: each turns a dataset's own layout into labelled image records.

A source only parses labels and finds files; opening every image, splitting and writing the manifest are
``dermray.data.stage``'s job, identical for all sources. Problems with single rows (a file listed but absent, an
unknown label, a duplicate id) become counted skips with a reason; problems with the whole input (a missing
column, no image found at all) raise a one-line ``DermrayError`` that names the fix.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermray import storage
from dermray.config import SourceFields
from dermray.data.listing import Listing, list_data_files, list_subfolders
from dermray.errors import DermrayError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]  # alphabetical, the MedMNIST order too


@dataclass
class Record:
    image_uri: str
    label_name: str
    group: str  # raw lesion/patient id (hashed before it reaches the manifest); the image id when unknown
    split: str | None = None  # set only by sources that carry their own splits


@dataclass
class Collected:
    source: str
    classes: list[str]
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image or row id, reason)
    unlisted: list[str] = field(default_factory=list)  # image files that no label row names
    taxonomy: str | None = None
    listing: Listing | None = None  # what the image folder held besides data (system files, links)
    may_hold_copies: bool = True  # False for generated images, distinct by construction: no duplicate search
    folded: dict[str, str] = field(default_factory=dict)  # label spelling variant -> the class it was folded into


class SourceOptions(SourceFields):
    """Everything a source may read (each source uses the fields its layout needs): the source fields of the
    config, where the manifest goes, and the synthetic source's settings."""

    out: str
    """Folder or prefix the manifest (and generated or extracted images) go to."""
    images_per_class: int = 150
    """synthetic source: images drawn per class."""
    image_size: int = 96
    """synthetic source: side of the generated images, in pixels."""
    seed: int = 0
    """Generator seed (synthetic source)."""


# ----------------------------------------------------------------------------------------------- helpers


def _require(value: str | None, flag: str, source: str) -> str:
    if not value:
        raise DermrayError(f"stage {source}: {flag} is required")
    return value


def read_labels_csv(uri: str, required: list[str]) -> pd.DataFrame:
    """A labels CSV as strings, refusing it in one line when a needed column is absent."""
    if not storage.exists(uri):
        raise DermrayError(f"labels file not found: {uri}")
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DermrayError(f"labels file {uri} is not a readable CSV ({str(error).splitlines()[0]})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DermrayError(
            f"labels file {uri} has no column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(frame.columns[:12])})"
        )
    return frame


def spelling_key(value: str) -> str:
    """What two spellings of one label share: case and spacing folded (``' Mel '``, ``'MEL'`` -> ``'mel'``)."""
    return " ".join(value.split()).casefold()


def fold_spellings(values: list[str], vocabulary: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The labels with every spelling variant replaced by its class name, and the variants that were replaced.

    With a vocabulary (the HAM10000 / ISIC codes, or ``--classes``) a variant becomes the vocabulary entry it
    spells; a value that spells none is left as it is, for the source to refuse row by row. Without one,
    variants of one label fold onto their most frequent spelling (ties: the first in sorted order), so one
    diagnosis never becomes several classes; the caller reports the mapping."""
    stripped = [v.strip() for v in values]
    if vocabulary is not None:
        canonical = {spelling_key(name): name for name in vocabulary}
    else:
        counts: dict[str, dict[str, int]] = {}
        for value in stripped:
            if value:
                spellings = counts.setdefault(spelling_key(value), {})
                spellings[value] = spellings.get(value, 0) + 1
        canonical = {key: min(spellings, key=lambda s: (-spellings[s], s)) for key, spellings in counts.items()}
    folded = [canonical.get(spelling_key(v), v) if v else v for v in stripped]
    variants = {raw: new for raw, new in zip(values, folded) if raw != new and raw.strip() != new}
    return folded, dict(sorted(variants.items()))


class ImageIndex:
    """Every image file under a folder or prefix, found by relative path or by file stem (system files and
    folders left out, each file once: see ``dermray.data.listing``)."""

    def __init__(self, images: str):
        self.root = storage.normalize(images)
        if not storage.is_dir(self.root):
            raise DermrayError(f"image folder not found or empty: {self.root}")
        self.listing = list_data_files(self.root)
        self.files = self.listing.files
        self.by_relpath = {self.listing.relpath(u): u for u in self.files}
        self.by_stem: dict[str, str] = {}
        for uri in self.files:
            stem, ext = os.path.splitext(storage.basename(uri))
            if ext.lower() in IMAGE_EXTENSIONS:
                self.by_stem.setdefault(stem, uri)

    def find(self, name: str) -> str | None:
        name = name.strip()
        return self.by_relpath.get(name) or self.by_stem.get(os.path.splitext(os.path.basename(name))[0])


def _records_from_rows(
    index: ImageIndex, ids: list[str], labels: list[str | None], groups: list[str], source: str
) -> tuple[list[Record], list[tuple[str, str]], list[str]]:
    """Join label rows to files: duplicates, absent files and unlabelled rows become counted skips, as do the
    second paths of files the listing reached twice."""
    records: list[Record] = []
    skipped: list[tuple[str, str]] = _same_file_skips(index.listing)
    seen: set[str] = set()
    used: set[str] = set()
    for image_id, label, group in zip(ids, labels, groups):
        if image_id in seen:
            skipped.append((image_id, "duplicate image id in labels file (first row kept)"))
            continue
        seen.add(image_id)
        uri = index.find(image_id)
        if uri is None:
            skipped.append((image_id, "listed in labels file but no such image file"))
            continue
        used.add(uri)
        if label is None:
            skipped.append((uri, "no usable label"))
            continue
        if label.startswith("!"):
            skipped.append((uri, label[1:]))
            continue
        records.append(Record(uri, label, group or image_id))
    if ids and not records and len([s for s in skipped if "no such image file" in s[1]]) == len(seen):
        raise DermrayError(
            f"stage {source}: none of the {len(seen)} images named in the labels file were found under "
            f"{index.root} (check --images)"
        )
    unlisted = [
        u for u in index.files if u not in used and os.path.splitext(u)[1].lower() in IMAGE_EXTENSIONS
    ]
    return records, skipped, unlisted


def _checked_label(value: str, classes: list[str]) -> str:
    value = value.strip()
    if value == "":
        return "!empty label"
    return value if value in classes else f"!unknown label '{value}' (known: {', '.join(classes)})"


def _one_hot_labels(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    labels = []
    for row in values:
        hot = np.flatnonzero(row >= 0.5)
        if np.isnan(row).any():
            labels.append("!non-numeric one-hot value")
        elif len(hot) != 1:
            labels.append(f"!one-hot row has {len(hot)} positive classes")
        else:
            labels.append(columns[hot[0]].lower())
    return labels


# ----------------------------------------------------------------------------------------------- sources


def collect_ham10000(opts: SourceOptions) -> Collected:
    """HAM10000: metadata CSV (lesion_id, image_id, dx, ...) and the image folder; grouped by lesion_id."""
    frame = read_labels_csv(_require(opts.labels, "--labels", "ham10000"), ["lesion_id", "image_id", "dx"])
    index = ImageIndex(_require(opts.images, "--images", "ham10000"))
    values, folded = fold_spellings(list(frame["dx"]), HAM_CLASSES)
    labels = [_checked_label(v, HAM_CLASSES) for v in values]
    records, skipped, unlisted = _records_from_rows(
        index, list(frame["image_id"]), labels, list(frame["lesion_id"]), "ham10000"
    )
    return Collected("ham10000", HAM_CLASSES, records, skipped, unlisted, taxonomy="ham10000",
                     listing=index.listing, folded=folded)


def _collect_one_hot(opts: SourceOptions, source: str, columns: list[str], taxonomy: str) -> Collected:
    frame = read_labels_csv(_require(opts.labels, "--labels", source), ["image"] + columns)
    index = ImageIndex(_require(opts.images, "--images", source))
    present = [c for c in columns if c != "UNK" or (pd.to_numeric(frame[c], errors="coerce") > 0.5).any()]
    labels = _one_hot_labels(frame, columns)
    classes = [c.lower() for c in present]
    labels = [lab if lab.startswith("!") or lab in classes else "!label UNK" for lab in labels]
    ids = list(frame["image"])
    records, skipped, unlisted = _records_from_rows(index, ids, labels, ids, source)
    if taxonomy == "ham10000":  # same class order as HAM10000/DermaMNIST, so models are interchangeable
        classes = HAM_CLASSES
    return Collected(source, classes, records, skipped, unlisted, taxonomy=taxonomy, listing=index.listing)


def collect_isic2018(opts: SourceOptions) -> Collected:
    """ISIC 2018 Task 3 ground truth: image, MEL, NV, BCC, AKIEC, BKL, DF, VASC (one-hot)."""
    return _collect_one_hot(opts, "isic2018", ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"], "ham10000")


def collect_isic2019(opts: SourceOptions) -> Collected:
    """ISIC 2019 ground truth: image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK (one-hot)."""
    columns = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    return _collect_one_hot(opts, "isic2019", columns, "isic2019")


def collect_isic2020(opts: SourceOptions) -> Collected:
    """ISIC 2020 train.csv: image_name, patient_id, ..., target (1 malignant); grouped by patient_id."""
    frame = read_labels_csv(_require(opts.labels, "--labels", "isic2020"), ["image_name", "patient_id", "target"])
    index = ImageIndex(_require(opts.images, "--images", "isic2020"))
    names = {"0": "benign", "1": "malignant"}
    labels = [names.get(v.strip(), f"!target must be 0 or 1, got '{v}'") for v in frame["target"]]
    records, skipped, unlisted = _records_from_rows(
        index, list(frame["image_name"]), labels, list(frame["patient_id"]), "isic2020"
    )
    return Collected("isic2020", ["benign", "malignant"], records, skipped, unlisted, taxonomy="isic2020",
                     listing=index.listing)


def _same_file_skips(listing: Listing) -> list[tuple[str, str]]:
    return [(path, f"the same file as {first} (reached twice through a link): staged once")
            for path, first in listing.same_file]


def collect_folder(opts: SourceOptions) -> Collected:
    """One sub-folder per class; the folder name is the label (spellings of one name folded into one class)."""
    root = storage.normalize(_require(opts.images, "--images", "folder"))
    class_dirs = list_subfolders(root)
    if not class_dirs:
        raise DermrayError(f"stage folder: no class sub-folders under {root} (expected <images>/<class>/<file>)")
    listing = list_data_files(root)
    # A folder link whose real folder is another class folder is not a class of its own: its files are there.
    linked = set(listing.links_not_followed)
    folder_names = [storage.basename(d) for d in class_dirs if storage.basename(d) not in linked]
    files_by_folder = [(listing.relpath(uri).replace(os.sep, "/").split("/", 1)[0], uri) for uri in listing.files]
    # Each file votes for its folder's spelling (the fuller folder's name wins); empty folders count once.
    votes = [folder for folder, _ in files_by_folder if folder in folder_names] + folder_names
    _, folded = fold_spellings(votes, list(opts.classes) if opts.classes else None)
    class_of = {name: folded.get(name, name) for name in folder_names}
    classes = list(opts.classes) if opts.classes else sorted(set(class_of.values()))
    records: list[Record] = []
    skipped: list[tuple[str, str]] = _same_file_skips(listing)
    for folder, uri in files_by_folder:
        base = storage.basename(uri)
        if folder not in class_of:
            skipped.append((uri, "not inside a class sub-folder"))
        elif class_of[folder] not in classes:
            skipped.append((uri, f"folder '{folder}' is not in --classes"))
        elif os.path.splitext(base)[1].lower() not in IMAGE_EXTENSIONS:
            skipped.append((uri, "not an image file extension"))
        else:
            records.append(Record(uri, class_of[folder], os.path.splitext(base)[0]))
    return Collected("folder", classes, records, skipped, listing=listing, folded=folded)


def collect_csv(opts: SourceOptions) -> Collected:
    """A generic labels CSV: --image-col (file name or path under --images), --label-col, optional --group-col."""
    required = [opts.image_col, opts.label_col] + ([opts.group_col] if opts.group_col else [])
    frame = read_labels_csv(_require(opts.labels, "--labels", "csv"), required)
    index = ImageIndex(_require(opts.images, "--images", "csv"))
    values, folded = fold_spellings(list(frame[opts.label_col]), list(opts.classes) if opts.classes else None)
    classes = list(opts.classes) if opts.classes else sorted({v for v in values if v})
    labels = [_checked_label(v, classes) for v in values]
    ids = list(frame[opts.image_col])
    groups = list(frame[opts.group_col]) if opts.group_col else ids
    records, skipped, unlisted = _records_from_rows(index, ids, labels, groups, "csv")
    return Collected("csv", classes, records, skipped, unlisted, listing=index.listing, folded=folded)


DERMAMNIST_CLASSES = HAM_CLASSES


def collect_medmnist(opts: SourceOptions) -> Collected:
    """A MedMNIST .npz (train/val/test _images and _labels): images are written to <out>/images as PNG, and the
    npz's own splits are kept."""
    from PIL import Image

    npz_uri = _require(opts.npz, "--npz", "medmnist")
    if not storage.exists(npz_uri):
        raise DermrayError(f"npz file not found: {npz_uri}")
    try:
        arrays = np.load(io.BytesIO(storage.read_bytes(npz_uri)), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DermrayError(f"{npz_uri} is not a readable .npz ({error})") from None
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays and f"{s}_labels" in arrays]
    if not splits:
        raise DermrayError(f"{npz_uri} holds no <split>_images/<split>_labels arrays (MedMNIST layout)")
    n_classes = int(max(int(arrays[f"{s}_labels"].max()) for s in splits)) + 1
    if opts.classes:
        classes = list(opts.classes)
    elif n_classes <= len(DERMAMNIST_CLASSES) and "derma" in os.path.basename(npz_uri).lower():
        classes = DERMAMNIST_CLASSES
    else:
        classes = [f"class_{i}" for i in range(n_classes)]
    if n_classes > len(classes):
        raise DermrayError(f"{npz_uri} has {n_classes} label values but --classes names {len(classes)}")
    images_root = storage.join(storage.normalize(opts.out), "images")

    def encode(item: tuple[str, int, np.ndarray]) -> str:
        split, i, pixels = item
        buffer = io.BytesIO()
        Image.fromarray(pixels.squeeze()).save(buffer, format="PNG")
        return storage.write_bytes(storage.join(images_root, split, f"{i:06d}.png"), buffer.getvalue())

    records: list[Record] = []
    for split in splits:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        with ThreadPoolExecutor(8) as pool:
            uris = list(pool.map(encode, ((split, i, images[i]) for i in range(len(images)))))
        records += [Record(u, classes[int(lab)], u, split) for u, lab in zip(uris, labels)]
    taxonomy = "ham10000" if classes == DERMAMNIST_CLASSES else None
    return Collected("medmnist", classes, records, taxonomy=taxonomy)


def collect_synthetic(opts: SourceOptions) -> Collected:
    """Procedural lesion-like images (the embedded default's data), written to <out>/images."""
    from dermray.data import synthetic

    images_root = storage.join(storage.normalize(opts.out), "images")
    rows = synthetic.generate(images_root, opts.images_per_class, opts.image_size, opts.seed)
    records = [Record(uri, label, group) for uri, label, group in rows]
    # Generated lesions are distinct by construction: the few smooth ones a perceptual hash confuses (4 near
    # matches in the embedded default's 600, one across labels) are the hash's false positives, not copies.
    return Collected("synthetic", list(synthetic.SYNTHETIC_CLASSES), records, taxonomy="synthetic",
                     may_hold_copies=False)


SOURCES: dict[str, Callable[[SourceOptions], Collected]] = {
    "ham10000": collect_ham10000,
    "isic2018": collect_isic2018,
    "isic2019": collect_isic2019,
    "isic2020": collect_isic2020,
    "medmnist": collect_medmnist,
    "folder": collect_folder,
    "csv": collect_csv,
    "synthetic": collect_synthetic,
}
