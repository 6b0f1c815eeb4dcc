"""``dermray bench``: measured throughput of the ingest pipeline and of training, against the alternatives.

``bench ingest`` runs, on the same files and the same per-image work (read the bytes from storage, Pillow decode
with draft mode, the train augmentation preset to N px), (a) the Ray Data pipeline feeding a consumer that does
nothing, (b) a ``torch.utils.data.DataLoader`` with as many worker processes as Ray Data had CPUs, (c) one
process decoding in a loop (the per-core bound), and with ``--pack`` (d) the packed-shard layout through Ray Data.

``bench train`` measures training images/s of one worker: synthetic in-memory uint8 batches (the compute bound)
against the real pipeline from a manifest, and their ratio; AMP (bf16) and channels-last on a GPU.

Both print a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch import nn

from dermray import storage
from dermray.config import AugmentConfig, TrainConfig
from dermray.data.imaging import decode_rgb
from dermray.data.ingest import build_dataset, train_preset
from dermray.data.listing import list_data_files
from dermray.data.manifest import Manifest, read_manifest
from dermray.data.pack import DEFAULT_ROWS_PER_SHARD, pack_shards
from dermray.data.sources import IMAGE_EXTENSIONS
from dermray.data.transforms import decode_size_hint
from dermray.errors import DermrayError
from dermray.models.backbones import build_model
from dermray.ray_runtime import ensure_ray
from dermray.train.engine import build_optimizer, build_scheduler, channels_last_for, resolved_amp, train_one_epoch


def _peak_rss_gib() -> float:
    """Peak resident memory of this process and of its finished children (DataLoader workers), in GiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024 / 1024, 2)


def _memory_in_use_bytes() -> int | None:
    """The machine's memory in use (MemTotal - MemAvailable), or None where /proc/meminfo does not exist."""
    try:
        with open("/proc/meminfo") as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in handle}
        return (fields["MemTotal"] - fields["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


class MachineMemoryPeak:
    """Peak of the machine's memory in use above its level at start, sampled every 0.2 s while the block runs.
    Unlike a process's own peak RSS it counts everything the benchmark starts: Ray's worker processes, the
    object store's shared memory, DataLoader workers (and anything else running meanwhile, so run it alone)."""

    def __enter__(self) -> MachineMemoryPeak:
        self.baseline = _memory_in_use_bytes()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self.baseline is not None and not self._stop.wait(0.2):
            self.peak = max(self.peak, (_memory_in_use_bytes() or 0) - self.baseline)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float | None:
        return round(self.peak / 2**30, 2) if self.baseline is not None else None


def _warmup_seconds(seconds: float) -> float:
    """Uncounted time before each ingest measurement, the same for every path: worker processes start, Ray's
    shuffle of the row list runs, its start-up actors settle (about 1.3 s of CPU each on 2 cores), and prefetch
    queues fill. The rates are then the steady state a long training run sees."""
    return min(5.0, seconds / 4)


def _timed(batches: Iterable, seconds: float, count: Callable[[object], int],
           warmup: float = 0.0) -> tuple[float, int]:
    """images/s of iterating ``batches`` for about ``seconds``, after the first batch and ``warmup`` seconds
    more (neither counted)."""
    iterator = iter(batches)
    next(iterator)
    warm_until = time.perf_counter() + warmup
    for _ in iterator:
        if time.perf_counter() >= warm_until:
            break
    images, started = 0, time.perf_counter()
    for batch in iterator:
        images += count(batch)
        if time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started
    return (images / elapsed if elapsed > 0 else 0.0), images


def _repeat(make: Callable[[], Iterable]) -> Iterable:
    """Epoch after epoch of a finite iterable (so a timed run can outlast a small image set)."""
    while True:
        yield from make()


def _passes(images: int, seconds: float, cpus: int) -> int:
    """Passes over a sample for one pipeline to outlast a measurement (at up to 450 images/s per CPU): the
    samples are small (62 and 300 images), and restarting the pipeline after every pass would time its
    start-up, not its throughput (the DataLoader baseline keeps its workers across passes too)."""
    return max(1, math.ceil(seconds * 450 * max(cpus, 1) / max(images, 1)) + 1)


def _grow_shards(prefix: str, rows: int) -> int:
    """Rewrite the packed sample under ``prefix`` as full-size shards (DEFAULT_ROWS_PER_SHARD rows each, the
    sample's rows repeated) holding about ``rows`` rows in all; returns how many. One dataset then streams the
    sample several times over through the layout real data has: the sample alone packs into one small shard (62
    rows for UDA-1), and streaming many copies of it timed Ray's per-file overhead, not the layout's."""


    originals = [f for f in storage.list_files(prefix) if f.endswith(".parquet")]
    sample = pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(f))) for f in originals])
    per_shard = sample.num_rows * max(1, DEFAULT_ROWS_PER_SHARD // sample.num_rows)
    shard = pa.concat_tables([sample] * (per_shard // sample.num_rows))
    buffer = pa.BufferOutputStream()
    pq.write_table(shard, buffer)
    data = buffer.getvalue().to_pybytes()
    shards = max(1, math.ceil(rows / per_shard))
    for index in range(shards):
        storage.write_bytes(storage.join(prefix, f"grown-{index:04d}.parquet"), data)
    for uri in originals:
        storage.delete(uri)
    return shards * per_shard


class _ImageFiles:
    """torch Dataset for the DataLoader baseline: exactly the per-image work of the Ray Data map function."""

    def __init__(self, uris: list[str], preset):
        self.uris, self.preset = uris, preset

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> np.ndarray:
        image = decode_rgb(storage.read_bytes(self.uris[index]), min_side=decode_size_hint(self.preset))
        return self.preset(image, np.random.default_rng())


def _dataloader_rate(dataset: _ImageFiles, workers: int, batch_size: int, seconds: float) -> float:
    """images/s of a DataLoader with ``workers`` processes (which exit when it goes out of scope here)."""

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=True, prefetch_factor=4)
    rate, _ = _timed(_repeat(lambda: loader), seconds, lambda batch: len(batch), _warmup_seconds(seconds))
    return rate


def list_images(images: str, limit: int | None) -> list[str]:
    uris = [u for u in list_data_files(images).files if os.path.splitext(u)[1].lower() in IMAGE_EXTENSIONS]
    if not uris:
        raise DermrayError(f"bench: no image files under {images}")
    return uris[:limit] if limit else uris


def _measure_packed(table, ray_epochs, passes: int, pack_size: int, pack_to: str | None, seconds: float) -> dict:
    """Pack the images, grow the shards to ``passes`` copies of the sample, and time Ray Data over them."""


    results: dict = {}
    # Shards in the same store as the images (--pack-to), so the comparison is the layout, not the store.
    local = None if pack_to else tempfile.mkdtemp(prefix="dermray-bench-")
    scratch = storage.join(pack_to or local, f"dermray-bench-{uuid.uuid4().hex[:8]}")
    try:
        started = time.perf_counter()
        packed = Manifest(table, ["x", "y"], "bench", packed=pack_shards(table, scratch, pack_size),
                          packed_size=pack_size)
        results["pack_seconds"] = round(time.perf_counter() - started, 1)
        grown = _grow_shards(storage.join(packed.packed, "train"), passes * table.num_rows)
        # The manifest of that many rows, as staging would write it (the pipeline sizes its blocks by it).
        packed = Manifest(pa.concat_tables([table] * math.ceil(grown / table.num_rows)).slice(0, grown),
                          ["x", "y"], "bench", packed=packed.packed, packed_size=pack_size)
        results["packed_images_per_s"], _ = _timed(ray_epochs(packed), seconds, lambda b: len(b["image"]),
                                                   _warmup_seconds(seconds))
        results["packed_at"] = storage.normalize(scratch)
    finally:
        storage.delete(local or scratch)
    return results


def bench_ingest(images: str, image_size: int = 224, seconds: float = 20.0, pack: bool = False,
                 pack_size: int = 256, limit: int | None = None, batch_size: int = 32,
                 pack_to: str | None = None) -> dict:
    uris = list_images(images, limit)
    preset = train_preset(image_size, AugmentConfig(rotation_degrees=180))
    ensure_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    table = pa.table({"image_uri": uris, "label": pa.array([0] * len(uris), pa.int32()),
                      "label_name": ["x"] * len(uris), "group_id": uris, "split": ["train"] * len(uris),
                      "source": ["bench"] * len(uris), "width": pa.array([0] * len(uris), pa.int32()),
                      "height": pa.array([0] * len(uris), pa.int32())})
    manifest = Manifest(table, ["x", "y"], "bench")

    def count(batch) -> int:
        return len(batch["image"])

    passes = _passes(len(uris), seconds + _warmup_seconds(seconds), cpus)

    def ray_epochs(source: Manifest):
        # Packed samples are repeated by growing their shards (_grow_shards) instead.
        return _repeat(lambda: build_dataset(source, "train", preset, passes=1 if source.packed else passes)
                       .iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4))

    results: dict = {"images": len(uris), "image_size": image_size, "cpus": cpus, "seconds": seconds}
    print(f"[dermray] bench ingest: {len(uris)} images from {storage.normalize(images)}, {cpus} CPUs, "
          f"{seconds:.0f}s per measurement", file=sys.stderr, flush=True)
    results["ray_data_images_per_s"], _ = _timed(ray_epochs(manifest), seconds, count, _warmup_seconds(seconds))

    results["dataloader_images_per_s"] = _dataloader_rate(_ImageFiles(uris, preset), cpus, batch_size, seconds)

    dataset = _ImageFiles(uris, preset)
    results["single_core_images_per_s"], _ = _timed(
        _repeat(lambda: ({"image": [dataset[i]]} for i in range(len(dataset)))), min(seconds, 10.0), count)

    if pack:
        results.update(_measure_packed(table, ray_epochs, passes, pack_size, pack_to, seconds))
        results["packed_vs_per_image"] = round(results["packed_images_per_s"] / results["ray_data_images_per_s"],
                                               2)
    ray_rate = results["ray_data_images_per_s"]
    results["ray_data_vs_dataloader"] = round(ray_rate / results["dataloader_images_per_s"], 2)
    results["ray_data_vs_cpus_x_single_core"] = round(
        results["ray_data_images_per_s"] / (cpus * results["single_core_images_per_s"]), 2)
    results["peak_rss_gib"] = _peak_rss_gib()
    for key in list(results):
        if key.endswith("_per_s"):
            results[key] = round(results[key], 1)
    return results


def bench_train(backbone: str, image_size: int, manifest: str | None = None, seconds: float = 20.0,
                batch_size: int = 32, use_gpu: bool | None = None, amp: str = "auto") -> dict:
    """Training images/s on synthetic batches and, given a manifest, through the real pipeline; ``amp`` as
    ``train.amp`` (with the memory format training gives it)."""
    device = torch.device("cuda" if (torch.cuda.is_available() if use_gpu is None else use_gpu) else "cpu")
    model = build_model(backbone, 7).to(device)
    if channels_last_for(device, amp):
        model = model.to(memory_format=torch.channels_last)
    cfg = TrainConfig(schedule="constant")
    optimizer = build_optimizer(list(model.parameters()), cfg, 1e-3)
    scheduler = build_scheduler(optimizer, cfg, 10**9, 10**6)
    criterion = nn.CrossEntropyLoss()

    def run(batches: Iterable) -> float:
        limited = _time_limited(batches, seconds)
        next(limited)  # warm-up batch (cudnn autotune, allocator)
        stats = train_one_epoch(model, limited, optimizer, scheduler, criterion, device, amp=amp)
        return stats.images_per_s

    synthetic = {"image": torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8),
                 "label": torch.randint(0, 7, (batch_size,))}
    if device.type == "cuda":
        synthetic["image"] = synthetic["image"].pin_memory()
    results = {"backbone": backbone, "image_size": image_size, "batch_size": batch_size, "device": str(device),
               "amp": resolved_amp(device, amp), "seconds": seconds,
               "synthetic_images_per_s": round(run(_forever(synthetic)), 1)}
    if manifest:
        import ray

        ensure_ray()
        loaded = read_manifest(manifest)
        preset = train_preset(image_size, AugmentConfig(rotation_degrees=180))
        # A packed manifest restarts its pipeline every pass (its shards are not ours to copy).
        passes = 1 if loaded.packed else _passes(loaded.split("train").num_rows, seconds,
                                                 int(ray.cluster_resources().get("CPU", 1)))
        real = _repeat(lambda: build_dataset(loaded, "train", preset, shuffle=True, passes=passes).iter_torch_batches(
            batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.int64},
            pin_memory=device.type == "cuda", prefetch_batches=4, drop_last=True))
        results["pipeline_images_per_s"] = round(run(real), 1)
        results["pipeline_vs_synthetic"] = round(results["pipeline_images_per_s"] / results["synthetic_images_per_s"],
                                                 2)
        results["manifest"] = storage.normalize(manifest)
    results["peak_rss_gib"] = _peak_rss_gib()
    return results


def _forever(batch: dict):
    while True:
        yield batch


def _time_limited(batches: Iterable, seconds: float):
    """The first batch (warm-up), then batches until ``seconds`` have passed."""
    iterator = iter(batches)
    yield next(iterator)
    started = time.perf_counter()
    for batch in iterator:
        yield batch
        if time.perf_counter() - started >= seconds:
            return


def print_table(name: str, results: dict) -> None:
    width = max(len(k) for k in results)
    lines = [f"dermray bench {name}"] + [f"  {k.ljust(width)}  {v}" for k, v in results.items()]
    print("\n".join(lines), file=sys.stderr, flush=True)
