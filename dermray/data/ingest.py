"""Ray Data ingest: manifest rows -> image bytes from storage -> decode -> augment -> uint8 batches.

Batches are dicts ``{"image": uint8 array (N, H, W, 3), "label": int64 (N,)}``: NHWC because that is how
Pillow lays pixels out, and because ``x.permute(0, 3, 1, 2)`` of an NHWC tensor is exactly a channels-last
NCHW tensor, the fast layout for convolutions on GPUs. Normalisation happens on the device
(``normalize_on_device``), so the host ships a quarter of the bytes that float32 would take.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dermray import storage
from dermray.config import AugmentConfig
from dermray.data.imaging import UnreadableImage, decode_rgb
from dermray.data.manifest import Manifest, split_names
from dermray.data.transforms import EvalPreset, TrainPreset, decode_size_hint
from dermray.errors import DermrayError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_ROWS_PER_BLOCK = 1024  # per-image layout (see _rows_per_block for the measurements)
MAX_PACKED_ROWS_PER_BLOCK = 512


def train_preset(image_size: int, augment: AugmentConfig, color_constancy: str = "none") -> TrainPreset:
    return TrainPreset(image_size=image_size, color_constancy=color_constancy, **augment.model_dump())


@dataclass(frozen=True)
class DecodeAndTransform:
    """The per-batch map function: reads each image (threads hide storage latency), decodes it with Pillow's
    draft mode at the size the preset needs, and applies the preset. Rows whose file became unreadable
    since staging are dropped and logged with the reason, never fed with a wrong label."""

    preset: TrainPreset | EvalPreset
    read_threads: int = 8
    passthrough: tuple[str, ...] = ()
    """Further columns copied to the output for the rows kept (e.g. ``image_uri`` for prediction)."""
    keep_failures: bool = False
    """Keep unreadable rows (a blank image and the reason in an ``error`` column, "" for good rows) instead of
    dropping them: batch prediction reports them rather than losing them."""

    @staticmethod
    def _fetch(uri: str) -> bytes | str:
        """The image's bytes, or the reason it is gone: a file deleted since staging is dropped and logged. Any
        other storage error (the endpoint still unreachable after storage's retries) fails the task instead: Ray
        retries it, and a run that still fails resumes from its last checkpoint, rather than silently training
        on fewer images."""
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError as error:
            return f"{type(error).__name__}: {error}"

    def _decode(self, data: bytes | str) -> np.ndarray | str:
        """The augmented image, or the reason the row is dropped."""
        if isinstance(data, str):
            return data  # the reason the fetch failed
        try:
            image = decode_rgb(data, min_side=decode_size_hint(self.preset))
        except UnreadableImage as error:
            return f"{type(error).__name__}: {error}"
        # Fresh OS entropy per image: Ray worker processes would otherwise repeat the same augmentations.
        rng = np.random.default_rng() if isinstance(self.preset, TrainPreset) else None
        return self.preset(image, rng)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Packed shards carry the bytes in "image"; the per-image layout reads each "image_uri" from storage.
        sources = batch["image"] if "image" in batch else batch["image_uri"]
        if "image" in batch:
            results = [self._decode(data) for data in sources]
        elif len(sources) == 0 or not storage.is_s3(str(sources[0])):
            # Local files: a read takes ~0.1 ms, less than handing it to a thread (local ISIC, 512-row blocks:
            # 290 img/s on 2 cores read in line, 270 with the thread pool).
            results = [self._decode(self._fetch(uri)) for uri in sources]
        else:
            # Threads only fetch (storage latency); decoding stays in this thread, overlapping the fetches still
            # in flight, so a task uses the one CPU Ray gave it (Pillow and OpenCV release the GIL: decoding in
            # the pool ran up to read_threads cores per task, crowding out the trainer's own processes).
            with ThreadPoolExecutor(max(1, min(self.read_threads, len(sources)))) as pool:
                results = [self._decode(data) for data in pool.map(self._fetch, sources)]
        size = self.preset.image_size
        if self.keep_failures:
            keep = list(range(len(results)))
            blank = np.zeros((size, size, 3), np.uint8)
            images = np.stack([blank if isinstance(r, str) else r for r in results]) if results else blank[None][:0]
        else:
            keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
            for i, r in enumerate(results):
                if isinstance(r, str):
                    log.warning("dermray ingest: skipped %s (%s)", os.path.basename(str(batch["image_uri"][i])), r)
            images = np.stack([results[i] for i in keep]) if keep else np.zeros((0, size, size, 3), np.uint8)
        out = {"image": images}
        if "label" in batch:  # unlabelled inputs (prediction over a folder) have none
            out["label"] = batch["label"][keep].astype(np.int64)
        if self.keep_failures:
            out["error"] = np.array([r if isinstance(r, str) else "" for r in results], dtype=object)
        for column in self.passthrough:
            out[column] = batch[column][keep]
        return out


def balanced_copies(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Expected copies of one row per epoch, by class, so that every present class is equally frequent and the
    epoch keeps its length (a minority class's rows are repeated, a majority's thinned; absent classes: 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = int((counts > 0).sum())
    per_class = max(1, len(labels) // max(present, 1))
    return tuple(per_class / n if n else 0.0 for n in counts.tolist())


@dataclass(frozen=True)
class BalancedDraw:
    """The per-batch map of class-balanced sampling: each row is kept ``floor(c)`` or ``floor(c) + 1`` times, with
    ``c`` its class's expected copies. The draw is fresh every epoch (OS entropy, as for augmentation), so the
    majority class's images all take their turn over the epochs instead of one subset drawn once for the run."""

    copies: tuple[float, ...]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = np.asarray(self.copies)[batch["label"]]
        whole = np.floor(expected)
        count = whole.astype(np.int64) + (np.random.default_rng().random(len(expected)) < expected - whole)
        index = np.repeat(np.arange(len(expected)), count)
        return {name: column[index] for name, column in batch.items()}


def build_dataset(
    manifest: Manifest,
    split: str,
    preset: TrainPreset | EvalPreset,
    read_threads: int = 8,
    shuffle: bool = False,
    balanced: bool = False,
    passthrough: tuple[str, ...] = (),
    passes: int = 1,
):
    """A Ray Data dataset of uint8 NHWC image batches and int64 labels for one split of a manifest, plus the
    manifest columns named in ``passthrough``. ``passes`` > 1 streams the split that many times over in one
    dataset (benchmarks on a small sample: one long pipeline, not a restart per pass)."""
    import ray

    rows = manifest.split(split).select(["image_uri", "label", *[c for c in passthrough if c != "image_uri"]])
    if rows.num_rows == 0:
        present = sorted(set(manifest.table["split"].to_pylist()))
        raise DermrayError(f"manifest has no images in split '{split}' (splits present: {', '.join(present)})")
    transform = DecodeAndTransform(preset, read_threads, tuple(passthrough))
    if not manifest.packed:
        _check_images_exist(rows["image_uri"].to_pylist(), split)
    if manifest.packed and not balanced:
        if passes != 1:
            # Ray reads a file that a list names twice only once: repeat packed data by writing more shards.
            raise ValueError("build_dataset: passes > 1 needs the per-image layout")
        # Only the columns the map reads: Ray Data converts every column of every batch between Arrow and numpy.
        columns = ["image", *rows.column_names]
        return _packed_dataset(manifest, split, shuffle, _rows_per_block(rows.num_rows, packed=True),
                               columns).map_batches(transform, batch_size=32, batch_format="numpy")
    if passes > 1:
        rows = pa.concat_tables([rows] * passes)
    # Slices of the row table, not a repartition: that is an all-to-all step the pipeline would wait on every epoch.
    step = _rows_per_block(rows.num_rows)
    ds = ray.data.from_arrow([rows.slice(start, step) for start in range(0, rows.num_rows, step)])
    if balanced:
        # The draw needs the row list: balanced sampling reads the per-image layout even when packed. It runs on the
        # rows, before any image is read, and before the shuffle, which then mixes a row's copies apart.
        ds = ds.map_batches(BalancedDraw(balanced_copies(rows["label"].to_numpy(), len(manifest.classes))),
                            batch_format="numpy")
    if shuffle:
        # Shuffling the tiny manifest rows (not the decoded pixels) is cheap; it re-runs every epoch.
        ds = ds.random_shuffle()
    return ds.map_batches(transform, batch_size=32, batch_format="numpy")


def _rows_per_block(rows: int, packed: bool = False) -> int:
    """Rows per decode task: at least 4 blocks per CPU when the split is large enough, so that an epoch's last
    tasks balance out, but at most 1024 rows: each task start and object-store round trip costs ~0.1 s on a small
    machine, time in which that CPU decodes nothing. On 2 cores, per-image ISIC JPEGs (~5 ms each) ran at 245
    img/s in 128-row blocks, 275 in 512-row ones; on a later machine 306-329 in 512-row blocks (the CPUs 4.6%
    idle) and 342-357 in 1024-row ones (2.4-2.9% idle). Packed images decode in ~2 ms, so their blocks hold at
    least 256: in 37-row blocks the packed ISIC sample ran at 365 img/s, 128 rows 464, 512 rows 739. They stay at
    most 512: in 1024-row blocks packed ISIC gained nothing (813 img/s, against 884 in 512-row ones the same day)
    and the benchmark's peak memory rose from 2.9 to 3.3 GiB."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if packed:
        return min(MAX_PACKED_ROWS_PER_BLOCK, max(256, rows // (4 * cpus)))
    return min(MAX_ROWS_PER_BLOCK, max(64, rows // (4 * cpus)))


def _check_images_exist(uris: list[str], split: str, samples: int = 4) -> None:
    """Fail before any training starts when the images a manifest names are gone (data moved or deleted since
    staging): otherwise every row would be skipped as unreadable, one warning at a time, and a run would "train"
    on nothing. A few evenly spaced files are checked, so the cost is a handful of storage requests."""
    picks = sorted({round(i * (len(uris) - 1) / max(samples - 1, 1)) for i in range(min(samples, len(uris)))})
    if not any(storage.exists(uris[i]) for i in picks):
        raise DermrayError(
            f"none of the {len(picks)} '{split}' images checked exist (e.g. {uris[picks[0]]}): the images moved or "
            "were deleted since the manifest was staged; re-run dermray stage")


def _packed_dataset(manifest: Manifest, split: str, shuffle: bool, rows_per_block: int, columns: list[str]):
    """The split's packed shards as a Ray Data dataset of rows with ``columns`` (``image`` holds the bytes)."""
    import ray

    files = []
    for part in split_names(split):
        prefix = storage.join(manifest.packed, part)
        shards = [f for f in storage.list_files(prefix) if f.endswith(".parquet")]
        if not shards:
            raise DermrayError(f"manifest names packed shards at {prefix} but there are none (re-stage with --pack)")
        files += shards
    # Rows were shuffled when packed; a new file order every epoch, plus the loop's local shuffle buffer, mixes
    # batches without moving the image bytes around the cluster.
    ds = ray.data.read_parquet(files, shuffle="files" if shuffle else None).select_columns(columns)
    # Ray reads a shard (thousands of images) into one block, which one task would decode image by image: a
    # streaming split into smaller blocks spreads the decoding over every CPU. (A repartition into N blocks is a
    # barrier that waits for the whole read: packed reads ran at 0.07x the per-image layout that way.)
    return ds.repartition(target_num_rows_per_block=rows_per_block)


def normalize_on_device(images, device, channels_last: bool = True):
    """uint8 NHWC batch -> float NCHW normalised with the ImageNet statistics, on ``device``."""
    import torch

    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
