"""``dermray stage``: any source -> validated, split manifest in storage.

Flow: the source lists labelled image records -> a Ray Data job opens every image (so validation scales out
with the cluster) -> unreadable files become counted skips -> grouped, stratified, stable splits (keeping the
previous manifest's assignments; exact and near-duplicate photos share one group, see ``dermray.data.duplicates``) ->
``<out>/manifest.parquet``, ``<out>/skipped.csv`` and ``<out>/duplicates.csv`` written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from dermray import storage
from dermray.data.duplicates import (
    DUPLICATES_NAME,
    NEAR_THRESHOLD,
    NO_PHASH,
    DuplicateSet,
    content_hash,
    find_duplicates,
    labels_differ,
    merge_groups,
    perceptual_hash,
    write_duplicates,
)
from dermray.data.imaging import UnreadableImage, probe_thumbnail
from dermray.data.manifest import Manifest, hash_group, manifest_uri, read_manifest, write_manifest
from dermray.data.pack import DEFAULT_ROWS_PER_SHARD, pack_shards
from dermray.data.sources import SOURCES, Collected, SourceOptions
from dermray.data.splits import SplitFractions, assign_splits
from dermray.errors import DermrayError
from dermray.taxonomy import infer_taxonomy

SKIPPED_NAME = "skipped.csv"
PROGRESS_SECONDS = 10.0


class Probe(NamedTuple):
    """What staging learns from opening one image: its stored size, a skip reason ("" when readable), and the
    hashes duplicate detection needs (see dermray.data.duplicates; "" when unreadable or, for phash, no RGB picture)."""

    width: int
    height: int
    reason: str
    sha256: str = ""
    phash: str = ""


def _probe_one(uri: str) -> Probe:
    # A file that vanished or may not be read is a counted skip. A storage outage that outlasts storage's retries
    # is not a property of the image: it fails the job (one line), so no image is skipped for a network blip.
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return Probe(0, 0, "file disappeared before it could be read")
    except PermissionError:
        return Probe(0, 0, "permission denied")
    except IsADirectoryError:
        return Probe(0, 0, "a folder, not a file")
    try:
        # The probe's own decode (draft scale) feeds the perceptual hash: no second read or full decode.
        info, picture = probe_thumbnail(data)
    except UnreadableImage as error:
        return Probe(0, 0, str(error))
    phash = perceptual_hash(picture) if picture is not None else NO_PHASH
    return Probe(info.width, info.height, "", content_hash(data), phash)


def _probe_batch(batch: dict[str, np.ndarray], read_threads: int = 8) -> dict[str, np.ndarray]:
    with ThreadPoolExecutor(read_threads) as pool:
        results = list(pool.map(_probe_one, batch["image_uri"]))
    return {
        "index": batch["index"],
        "width": np.array([r[0] for r in results], dtype=np.int32),
        "height": np.array([r[1] for r in results], dtype=np.int32),
        "reason": np.array([r.reason for r in results], dtype=object),
        "sha256": np.array([r.sha256 for r in results], dtype=object),
        "phash": np.array([r.phash for r in results], dtype=object),
    }


def probe_images(uris: list[str]) -> list[Probe]:
    """A ``Probe`` (size, skip reason or "", content and perceptual hash) for every image, by a Ray Data job."""
    import ray

    from dermray.ray_runtime import ensure_ray

    if not uris:
        return []
    ensure_ray()
    items = [{"index": i, "image_uri": uri} for i, uri in enumerate(uris)]
    # Enough blocks to keep every CPU busy, and blocks of at most ~1000 images at scale, so that progress is
    # steady and a retried task redoes little.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(1, min(len(items) // 64, max(4 * cpus, math.ceil(len(items) / 1024))))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(_probe_batch, batch_size=64)
    results: list[Probe] = [Probe(0, 0, "not probed")] * len(uris)
    started = last_report = time.monotonic()
    for done, row in enumerate(ds.iter_rows(), start=1):
        results[int(row["index"])] = Probe(int(row["width"]), int(row["height"]), str(row["reason"]),
                                           str(row["sha256"]), str(row["phash"]))
        if time.monotonic() - last_report > PROGRESS_SECONDS:
            last_report = time.monotonic()
            rate = done / (last_report - started)
            print(f"[dermray] stage: opened {done}/{len(uris)} images ({rate:.0f}/s, "
                  f"ETA {(len(uris) - done) / rate:.0f}s)", file=sys.stderr, flush=True)
    return results


def _write_skipped(uri: str, skipped: list[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "reason"])
    writer.writerows(skipped)
    return storage.write_text(uri, buffer.getvalue())


def stage(source: str, opts: SourceOptions, fractions: SplitFractions = SplitFractions(), seed: int = 0,
          pack_size: int | None = None, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> dict:
    """Stage a dataset into ``<opts.out>/manifest.parquet`` and return the JSON summary. With ``pack_size``,
    also write packed shards of the images resized to that longest side (see ``dermray.data.pack``)."""
    if source not in SOURCES:
        raise DermrayError(f"stage: unknown source '{source}'; choose one of: {', '.join(SOURCES)}")
    started = time.monotonic()
    out = storage.normalize(opts.out)
    collected: Collected = SOURCES[source](opts)
    _report_collection(source, collected)
    kept, probes, skipped = _readable(source, collected, out)
    uris = [r.image_uri for r in kept]
    class_index = {name: i for i, name in enumerate(collected.classes)}
    labels = [class_index[r.label_name] for r in kept]
    # Copies of one photo under other names (and other lesion ids) share one group, hence one split.
    duplicate_sets = (find_duplicates([p.sha256 for p in probes], [p.phash for p in probes])
                      if collected.may_hold_copies else [])
    groups = merge_groups([hash_group(source, r.group) for r in kept], duplicate_sets)
    if all(r.split for r in kept):
        splits = [r.split for r in kept]
    else:
        previous, previous_groups = _previous_assignments(out)
        splits = assign_splits(uris, labels, groups, fractions, seed, previous, previous_groups)
    duplicates = _duplicate_counts(duplicate_sets, [r.label_name for r in kept], splits)
    table = pa.table({
        "image_uri": uris, "label": pa.array(labels, pa.int32()), "label_name": [r.label_name for r in kept],
        "group_id": groups, "split": splits, "source": [source] * len(kept),
        "width": pa.array([p.width for p in probes], pa.int32()),
        "height": pa.array([p.height for p in probes], pa.int32()),
    })
    manifest = Manifest(table, collected.classes, source, collected.taxonomy or infer_taxonomy(collected.classes))
    uri = _write_manifest_and_shards(manifest, out, pack_size, rows_per_shard)
    report = skipped + [(u, "image file not named in the labels file (unlisted)") for u in collected.unlisted]
    skipped_uri = _write_skipped(storage.join(out, SKIPPED_NAME), report)
    duplicates["report"] = write_duplicates(storage.join(out, DUPLICATES_NAME), duplicate_sets, uris,
                                            [r.label_name for r in kept])
    _report_duplicates(source, duplicates)
    split_counts = Counter(splits)
    summary = {
        "manifest": uri, "source": source, "images": len(kept), "skipped": len(skipped),
        "unlisted": len(collected.unlisted), "ignored": collected.listing.summary() if collected.listing else {},
        "label_spellings_folded": collected.folded,
        "skipped_reasons": dict(Counter(_reason_kind(reason) for _, reason in skipped)),
        "skipped_report": skipped_uri, "classes": collected.classes,
        "splits": {name: split_counts.get(name, 0) for name in sorted(split_counts)},
        "per_class": {split: manifest.class_counts(split) for split in sorted(split_counts)},
        "duplicates": duplicates, "packed": manifest.packed, "seconds": round(time.monotonic() - started, 1),
    }
    storage.write_text(storage.join(out, "stage_summary.json"), json.dumps(summary, indent=2))
    return summary


def _readable(source: str, collected: Collected, out: str) -> tuple[list, list[Probe], list[tuple[str, str]]]:
    """(the records whose image opened, their probes, every skip so far with its reason): each image is opened
    once by a Ray Data job; none readable is a one-line error pointing at the skip report."""
    skipped = list(collected.skipped)
    kept, probes = [], []
    for record, probe in zip(collected.records, probe_images([r.image_uri for r in collected.records])):
        if probe.reason:
            skipped.append((record.image_uri, probe.reason))
        else:
            kept.append(record)
            probes.append(probe)
    if not kept:
        report_uri = _write_skipped(storage.join(out, SKIPPED_NAME), skipped)
        raise DermrayError(
            f"stage {source}: no readable, labelled image left ({len(skipped)} skipped; reasons in {report_uri})"
        )
    return kept, probes, skipped


def _write_manifest_and_shards(manifest: Manifest, out: str, pack_size: int | None, rows_per_shard: int) -> str:
    """Write the manifest (and with ``pack_size`` its packed shards first: a reader of the manifest never meets
    half-written shards); shards of an earlier staging that this one superseded are deleted after."""
    previous_shards = read_manifest(manifest_uri(out)).packed if storage.exists(manifest_uri(out)) else None
    if pack_size:
        manifest.packed = pack_shards(manifest.table, out, pack_size, rows_per_shard,
                                      stamp=time.strftime("%Y%m%dT%H%M%S"))
        manifest.packed_size = pack_size
    uri = write_manifest(manifest_uri(out), manifest)
    if previous_shards and previous_shards != manifest.packed and storage.is_dir(previous_shards):
        storage.delete(previous_shards)
    return uri


def _report_collection(source: str, collected: Collected) -> None:
    """One stderr line each for what the source left out or folded, so a user sees it before the long part."""
    ignored = collected.listing.summary() if collected.listing else {}
    if ignored.get("system_files") or ignored.get("system_folders"):
        print(f"[dermray] stage {source}: ignored {ignored['system_files']} hidden or system file(s) "
              f"({ignored['system_folders']} folder(s) such as __MACOSX, .ipynb_checkpoints, @eaDir)",
              file=sys.stderr, flush=True)
    if ignored.get("folder_links_not_followed") or ignored.get("same_file_twice"):
        print(f"[dermray] stage {source}: {ignored['folder_links_not_followed']} folder link(s) not followed "
              f"(their folder was listed already), {ignored['same_file_twice']} file(s) reached twice staged once",
              file=sys.stderr, flush=True)
    if collected.folded:
        mapping = ", ".join(f"{raw!r} -> {name!r}" for raw, name in collected.folded.items())
        print(f"[dermray] stage {source}: label spellings folded: {mapping}", file=sys.stderr, flush=True)


def _duplicate_counts(sets: list[DuplicateSet], label_names: list[str], splits: list[str]) -> dict:
    """The summary's duplicate counts. A set whose members ended in two splits is a conflict that only old
    assignments (or a source's own splits) can cause: old images are never moved, so it is counted instead."""
    return {
        "sets": len(sets),
        "images": sum(len(d.members) for d in sets),
        "exact_copies": sum(k == "exact" for d in sets for k in d.kinds[1:]),
        "near_copies": sum(k == "near" for d in sets for k in d.kinds[1:]),
        "labels_differ": sum(labels_differ(d, label_names) for d in sets),
        "split_conflicts": sum(len({splits[i] for i in d.members}) > 1 for d in sets),
        "near_threshold": NEAR_THRESHOLD,
    }


def _report_duplicates(source: str, counts: dict) -> None:
    """One stderr line when duplicates were found: how many, and the conflicts left for a person to resolve."""
    if counts["sets"]:
        print(f"[dermray] stage {source}: {counts['sets']} duplicate set(s) over {counts['images']} images "
              f"({counts['exact_copies']} exact, {counts['near_copies']} near copies) share a group and a split; "
              f"{counts['labels_differ']} set(s) with differing labels kept as labelled, "
              f"{counts['split_conflicts']} split conflict(s) (see {counts['report']})", file=sys.stderr, flush=True)


def _reason_kind(reason: str) -> str:
    """Reasons grouped for the summary (the full text, with the file, is in skipped.csv)."""
    return reason.split(" (")[0].split(":")[0].split("'")[0].strip()


def _previous_assignments(out: str) -> tuple[dict[str, str], dict[str, str]]:
    uri = manifest_uri(out)
    if not storage.exists(uri):
        return {}, {}
    old = read_manifest(uri).table
    images = dict(zip(old["image_uri"].to_pylist(), old["split"].to_pylist()))
    groups = dict(zip(old["group_id"].to_pylist(), old["split"].to_pylist()))
    return images, groups
