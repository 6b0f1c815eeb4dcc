"""Packed shards: images resized once (longest side N, JPEG) into Parquet files of many rows each, so training
reads a few large objects instead of one GET per image, and decodes ~10 KB instead of ~300 KB per image.

Layout: ``<out>/shards-<time>/<split>/*.parquet`` with columns ``image`` (JPEG bytes), ``image_uri`` (the
original, so every row still names its source), ``label`` and ``group_id``. Shards are written by a Ray Data job
(read, decode in draft mode, resize, encode: scales out like staging's validation) before the manifest that names
them is published, so a reader never sees a manifest pointing at half-written shards.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from dermray import storage
from dermray.data.imaging import decode_rgb

JPEG_QUALITY = 90
DEFAULT_ROWS_PER_SHARD = 2000


def resized_jpeg(data: bytes, longest_side: int) -> bytes:
    """The image, upright RGB, scaled (down only) so its longest side is ``longest_side``, as JPEG bytes."""
    with Image.open(io.BytesIO(data)) as header:  # size only: the decode below does the validation
        width, height = header.size
    # Draft decoding at the reduced scale that still leaves the shorter side at least its target length.
    shorter_target = math.ceil(longest_side * min(width, height) / max(width, height, 1))
    image = decode_rgb(data, min_side=max(1, min(shorter_target, min(width, height))))
    if max(image.size) > longest_side:
        image.thumbnail((longest_side, longest_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class PackBatch:
    """Ray Data map function: manifest rows -> rows with the resized JPEG bytes (threads hide storage latency)."""

    def __init__(self, longest_side: int, read_threads: int = 8):
        self.longest_side = longest_side
        self.read_threads = read_threads

    def _one(self, uri: str) -> bytes:
        return resized_jpeg(storage.read_bytes(uri), self.longest_side)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Every image passed validation at staging moments ago; one that fails now fails the job (one line),
        # rather than leaving a manifest row without its pixels.
        with ThreadPoolExecutor(min(self.read_threads, max(1, len(batch["image_uri"])))) as pool:
            images = list(pool.map(self._one, batch["image_uri"]))
        return {"image": np.array(images, dtype=object), "image_uri": batch["image_uri"],
                "label": batch["label"].astype(np.int32), "group_id": batch["group_id"]}


def pack_shards(table: pa.Table, out: str, longest_side: int, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                stamp: str = "") -> str:
    """Write the packed shards of a manifest table under ``<out>/shards-<stamp>``; returns that prefix."""
    import ray

    prefix = storage.join(storage.normalize(out), f"shards-{stamp}" if stamp else "shards")
    for split in sorted(set(table["split"].to_pylist())):
        rows = table.filter(pc.equal(table["split"], split)).select(["image_uri", "label", "group_id"])
        # Shards hold a seeded random mix: manifests list images class by class, and a reader takes a shard's
        # rows in order.
        rows = rows.take(pa.array(np.random.default_rng(0).permutation(rows.num_rows)))
        shards = max(1, math.ceil(rows.num_rows / rows_per_shard))
        # Enough tasks to use the cluster even when one shard holds the whole split.
        blocks = max(shards, min(64, math.ceil(rows.num_rows / 64)))
        dataset = ray.data.from_arrow(rows).repartition(blocks).map_batches(
            PackBatch(longest_side), batch_size=64, batch_format="numpy")
        dataset.write_parquet(storage.join(prefix, split), min_rows_per_file=min(rows_per_shard, rows.num_rows),
                              max_rows_per_file=rows_per_shard)
    return prefix
