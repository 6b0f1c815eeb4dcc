"""Exact and near-duplicate images, found from hashes computed while staging opens every image.

* Exact: equal SHA-256 of the file bytes (the same file under two names).
* Near: a 256-bit DCT perceptual hash (``imagehash.phash`` with hash_size 16) within ``NEAR_THRESHOLD`` bits
  of Hamming distance (the same photo re-encoded, resized or re-uploaded). The threshold was chosen on real
  data: see docs/duplicates.md. The usual 64-bit phash is not enough for dermoscopy: photos of different
  lesions (a round lesion centred on skin) are so alike at 8x8 DCT frequencies that at 4 of 64 bits, the
  distance needed to catch re-encodings, 2.4% of the HAM10000 photos matched a photo of a different lesion.

Duplicates are joined transitively (union-find) into duplicate sets. Staging then puts every group (lesion or
patient) that a duplicate set touches into one merged group, so a photo and its copy never sit on two sides of
a split. Near-duplicate search compares all pairs, in blocks, on the hashes packed as 4 x uint64 with a
vectorised popcount: quadratic in the number of distinct images, 1.3 s for 8,010 and 7.6 s for 20,000 on one
core, so fit for up to about 100,000 (about 3 min); beyond that it needs an index (docs/duplicates.md).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dermray import storage

NEAR_THRESHOLD = 34
"""Largest Hamming distance (of 256 bits) between perceptual hashes counted as a near-duplicate."""
HASH_SIZE = 16  # phash of the 16x16 lowest DCT frequencies of a 64x64 grey picture: 256 bits, 64 hex digits

DUPLICATES_NAME = "duplicates.csv"
FLAT_STD = 2.0  # grey levels; real dermoscopy photos are far above (ham10000-300: see docs/duplicates.md)
NO_PHASH = ""  # no perceptual hash (an image mode with no RGB picture): only exact matching applies
_WORDS = HASH_SIZE * HASH_SIZE // 64
_BLOCK = 256  # rows per block of the all-pairs comparison: 256 x n x 4 uint64 (8 MB per 1,000 images)


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of the file bytes: equal only for byte-identical files."""
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(img: Image.Image) -> str:
    """The 256-bit DCT perceptual hash of a picture, as 64 hex digits.

    Stable under JPEG re-encoding and resizing, since it keeps only the signs (against their median) of the
    lowest 16x16 DCT frequencies of a 64x64 grey version. The picture may be a draft-mode thumbnail of 64 px
    or more: the hash is taken at 64x64 anyway.

    A featureless picture (grey standard deviation under ``FLAT_STD`` levels: a blank frame, a solid colour) gets
    ``NO_PHASH``: its DCT is all zeros past the mean, so every flat picture would share one hash and two blank
    images of different colours would be "copies". Such images are matched by their bytes only."""
    import imagehash

    # imagehash.phash converts to grey and resizes to 64x64 with LANCZOS itself; handing it this picture, already
    # that, gives the same hash and saves a second resize (0.39 ms instead of 1.71 per ham10000-300 image).
    grey = img.convert("L").resize((HASH_SIZE * 4, HASH_SIZE * 4), Image.Resampling.LANCZOS)
    if float(np.asarray(grey, dtype=np.float32).std()) < FLAT_STD:
        return NO_PHASH
    return str(imagehash.phash(grey, hash_size=HASH_SIZE))


def _packed(hashes: list[str]) -> np.ndarray:
    """Hex hashes as an (n, 4) uint64 array (rows for ``NO_PHASH`` are zero and must be masked out)."""
    out = np.zeros((len(hashes), _WORDS), dtype=np.uint64)
    for i, value in enumerate(hashes):
        if value != NO_PHASH:
            out[i] = np.frombuffer(bytes.fromhex(value), dtype=">u8")
    return out


def hamming(a: str, b: str) -> int:
    """Bits that differ between two perceptual hashes (as returned by ``perceptual_hash``)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def near_pairs(hashes: list[str], threshold: int = NEAR_THRESHOLD) -> list[tuple[int, int, int]]:
    """Every pair (i, j, distance) with i < j whose hashes differ in at most ``threshold`` bits.

    ``NO_PHASH`` entries never match. All pairs are compared, one block of rows at a time, with a vectorised
    popcount: exact for any threshold, quadratic in time, linear in memory."""
    valid = np.array([i for i, h in enumerate(hashes) if h != NO_PHASH], dtype=np.int64)
    packed = _packed([hashes[i] for i in valid])
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, len(packed), _BLOCK):
        block = packed[start:start + _BLOCK]
        rest = packed[start:]  # only columns from the block's own first row on: each pair once
        distance = np.bitwise_count(block[:, None, :] ^ rest[None, :, :]).sum(axis=2, dtype=np.int32)
        rows, cols = np.nonzero(distance <= threshold)
        keep = cols > rows  # no self-pairs, and no pair twice within the block
        for r, c in zip(rows[keep], cols[keep]):
            pairs.append((int(valid[start + r]), int(valid[start + c]), int(distance[r, c])))
    return pairs


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller index is the root, so a set's root is its first image in listing order.
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class DuplicateSet:
    """Images that are copies of one photo. ``members[0]`` is the reference (the first in listing order);
    ``kinds``/``distances`` say how each member relates to it: "exact" (same bytes, distance 0) or "near"
    (perceptual-hash distance; a member joined through a chain may be further than the threshold)."""

    set_id: str
    members: list[int]
    kinds: list[str]
    distances: list[int]


def find_duplicates(sha256: list[str], phash: list[str], threshold: int = NEAR_THRESHOLD) -> list[DuplicateSet]:
    """The duplicate sets (two or more images) among images with these content and perceptual hashes, in order
    of their reference image. Set ids are ``dup-00001``... in that order."""
    n = len(sha256)
    sets = _UnionFind(n)
    first_with: dict[str, int] = {}
    for i, digest in enumerate(sha256):
        if digest in first_with:
            sets.union(first_with[digest], i)
        else:
            first_with[digest] = i
    # Compare one image per distinct content: exact copies share the hash and would only add pairs.
    distinct = sorted(first_with.values())
    for a, b, _ in near_pairs([phash[i] for i in distinct], threshold):
        sets.union(distinct[a], distinct[b])

    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[sets.find(i)].append(i)
    result = []
    for root in sorted(r for r, m in members.items() if len(m) > 1):
        group = members[root]
        ref = group[0]
        kinds = ["exact" if sha256[i] == sha256[ref] else "near" for i in group]
        distances = [0 if k == "exact" else _distance(phash[i], phash[ref]) for i, k in zip(group, kinds)]
        result.append(DuplicateSet(f"dup-{len(result) + 1:05d}", group, kinds, distances))
    return result


def _distance(a: str, b: str) -> int:
    """Hamming distance, or -1 where either image has no perceptual hash (joined through a chain)."""
    return hamming(a, b) if NO_PHASH not in (a, b) else -1


def merge_groups(groups: list[str], sets: list[DuplicateSet]) -> list[str]:
    """Each image's group after joining every group a duplicate set touches into one.

    Groups are unioned transitively (a duplicate of lesion A's photo filed under lesion B joins all of A and B,
    or the lesion would straddle splits). A merged group takes the smallest of its group ids, so a group that no
    duplicate touches keeps its id, and the result does not depend on listing order."""
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    union = _UnionFind(len(names))
    for dup in sets:
        first = index[groups[dup.members[0]]]
        for member in dup.members[1:]:
            union.union(first, index[groups[member]])
    # Roots are the smallest index, and names are sorted: the root's name is the smallest group id.
    return [names[union.find(index[g])] for g in groups]


def labels_differ(dup: DuplicateSet, labels: list[str]) -> bool:
    """True when members of a duplicate set carry different labels (a conflict: nothing is relabelled)."""
    return len({labels[i] for i in dup.members}) > 1


def write_duplicates(uri: str, sets: list[DuplicateSet], image_uris: list[str], labels: list[str]) -> str:
    """Write ``duplicates.csv`` atomically (via dermray.storage): one row per member of every duplicate set,
    columns set_id, image_uri, kind, distance, label, labels_differ (the reference is each set's first row)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["set_id", "image_uri", "kind", "distance", "label", "labels_differ"])
    for dup in sets:
        differ = labels_differ(dup, labels)
        for member, kind, distance in zip(dup.members, dup.kinds, dup.distances):
            writer.writerow([dup.set_id, image_uris[member], kind, distance, labels[member], differ])
    return storage.write_text(uri, buffer.getvalue())
