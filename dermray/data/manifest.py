"""The manifest: one Parquet table per dataset, one row per image, the single input of training.

Columns: ``image_uri`` (full URI), ``label`` (int), ``label_name``, ``group_id`` (a salted hash of the lesion or
patient id: it groups splits without exposing the identifier), ``split``, ``source``, ``width``, ``height``.
The class list (index -> name, classes with no images included) and the taxonomy name travel in the Parquet
schema metadata, so label ids mean the same thing everywhere the manifest goes.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dermray import storage
from dermray.errors import DermrayError

MANIFEST_NAME = "manifest.parquet"

SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("group_id", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def hash_group(source: str, raw_group: str) -> str:
    """A stable pseudonym for a lesion or patient id (the same id always maps to the same value)."""
    return "g" + hashlib.sha256(f"dermray:{source}:{raw_group}".encode()).hexdigest()[:16]


def split_names(name: str) -> list[str]:
    """The manifest splits a split name stands for: ``train+test`` is the train and test splits together."""
    return [part.strip() for part in name.split("+")]


@dataclass
class Manifest:
    table: pa.Table
    classes: list[str]
    source: str
    taxonomy: str | None = None
    packed: str | None = None
    """The packed layout, when staged with --pack: the prefix holding ``<split>/*.parquet`` shards of resized JPEG
    bytes (with image_uri, label and group per row); training reads those instead of one object per image."""
    packed_size: int | None = None
    """The longest side, in pixels, of the images in the shards."""

    def split(self, name: str) -> pa.Table:
        """The rows of split ``name``, or of several joined by ``+`` (``train+test``)."""
        return self.table.filter(pc.is_in(self.table["split"], value_set=pa.array(split_names(name))))

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        table = self.split(split) if split else self.table
        counts = {name: 0 for name in self.classes}
        for label in table["label"].to_pylist():
            counts[self.classes[label]] += 1
        return counts


def manifest_uri(out: str) -> str:
    """``<out>/manifest.parquet`` unless ``out`` already names a .parquet file."""
    out = storage.normalize(out)
    return out if out.endswith(".parquet") else storage.join(out, MANIFEST_NAME)


def write_manifest(uri: str, manifest: Manifest) -> str:
    """Write atomically: readers see the previous manifest or this one, never a partial file."""
    metadata = {
        b"dermray.classes": json.dumps(manifest.classes).encode(),
        b"dermray.source": manifest.source.encode(),
        b"dermray.taxonomy": (manifest.taxonomy or "").encode(),
    }
    if manifest.packed:
        metadata[b"dermray.packed"] = manifest.packed.encode()
        metadata[b"dermray.packed_size"] = str(manifest.packed_size).encode()
    table = manifest.table.cast(SCHEMA).replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return storage.write_bytes(uri, buffer.getvalue())


def read_manifest(uri: str) -> Manifest:
    """Read a manifest written by ``dermray stage`` (a folder holding manifest.parquet, or the file)."""
    uri = manifest_uri(uri)
    if not storage.exists(uri):
        raise DermrayError(f"manifest not found: {uri} (create it with `dermray stage ... --out <folder>`)")
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except pa.ArrowInvalid as error:
        raise DermrayError(f"manifest {uri} is not a readable Parquet file ({error})") from None
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    meta = table.schema.metadata or {}
    if missing or b"dermray.classes" not in meta:
        raise DermrayError(f"{uri} is not a dermray manifest (missing {missing or 'class metadata'})")
    return Manifest(
        table=table.select(SCHEMA.names).replace_schema_metadata(None).cast(SCHEMA),
        classes=json.loads(meta[b"dermray.classes"]),
        source=meta.get(b"dermray.source", b"").decode(),
        taxonomy=meta.get(b"dermray.taxonomy", b"").decode() or None,
        packed=meta.get(b"dermray.packed", b"").decode() or None,
        packed_size=int(meta[b"dermray.packed_size"]) if b"dermray.packed_size" in meta else None,
    )
