"""``dermray nightly``: re-stage new data, train a challenger, promote it only when it is better.

One run, under the registry lock:

1. fingerprint the source (every image's URI, size and modification time, and the labels file's content); if it
   is what the last completed run saw and a champion exists, stop: nothing is written, nothing changes;
2. re-stage the source into ``nightly.dataset`` (stable grouped splits: old images keep their split, so the
   holdout only grows and never leaks into training);
3. train a challenger, warm-started from the champion when the architecture and classes still match;
4. evaluate challenger and champion on the same holdout split (reports under ``<registry>/reports/<run>/``);
5. promote the challenger when it beats the champion's metric by ``nightly.margin`` without its malignant
   sensitivity falling below ``nightly.min_malignant_sensitivity`` (the first challenger is promoted when it
   clears the floor), by compare-and-swap of the champion pointer;
6. record the decision in the registry history and the data fingerprint.

A run killed anywhere before step 5 leaves the champion untouched; its lock expires after
``nightly.lock_ttl_hours`` and the next run retrains, because the fingerprint was not recorded.
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid

from dermray import storage
from dermray.config import Config, NightlyConfig, SourceFields
from dermray.data.listing import list_data_files
from dermray.data.manifest import manifest_uri
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.errors import DermrayError
from dermray.evaluation.evaluate import evaluate
from dermray.models.checkpoint import warm_start_mismatch
from dermray.ops import run_tracking
from dermray.ops.registry import Registry, utc_stamp
from dermray.ray_runtime import ensure_ray
from dermray.train.trainer import train


def _log(message: str) -> None:
    print(f"[dermray] nightly: {message}", file=sys.stderr, flush=True)


def source_fingerprint(cfg: NightlyConfig) -> dict:
    """A digest of everything the source reads: image listings (URI, size, mtime) and label files' bytes."""
    digest = hashlib.sha256()
    images = 0
    if cfg.source == "synthetic":
        digest.update(f"synthetic:{cfg.synthetic_images_per_class}".encode())
    if cfg.images:
        # The files staging reads, as staging lists them: a Finder's .DS_Store or a NAS thumbnail appearing is
        # not new data (it would retrain a model for nothing), and a folder link that loops is followed once.
        listing = list_data_files(cfg.images, with_stats=True)
        for uri in listing.files:
            size, mtime = listing.stats[uri]
            digest.update(f"{uri}\0{size}\0{mtime}\n".encode())
            images += 1
    for uri in (cfg.labels, cfg.npz):
        if uri:
            digest.update(hashlib.sha256(storage.read_bytes(uri)).digest())
    return {"digest": digest.hexdigest(), "files": images}


def _stage(cfg: NightlyConfig, seed: int) -> dict:
    options = SourceOptions(out=cfg.dataset, images_per_class=cfg.synthetic_images_per_class, seed=seed,
                            **cfg.model_dump(include=set(SourceFields.model_fields)))
    return stage(cfg.source, options, seed=seed)


def _warm_start(champion_checkpoint: str | None, config: Config, classes: list[str]) -> str | None:
    """The champion checkpoint to start from, when it has the same backbone and classes (else a fresh start)."""
    if not champion_checkpoint:
        return None
    mismatch = warm_start_mismatch(champion_checkpoint, config.model.backbone, classes)
    if mismatch:
        _log(f"the champion cannot warm-start this run ({mismatch}): training the challenger from scratch")
        return None
    return champion_checkpoint


def _holdout_metrics(checkpoint: str, manifest: str, split: str, out: str) -> dict:
    return evaluate(checkpoint=checkpoint, manifest=manifest, split=split, out=out)["metrics"]


def malignant_sensitivity(metrics: dict) -> float | None:
    """Sensitivity for the malignant coarse class at the model's decision, or None without a taxonomy."""
    value = metrics.get("malignant_sensitivity")
    return float(value) if value is not None else None


def decide(cfg: NightlyConfig, challenger: dict, champion: dict | None) -> tuple[bool, str]:
    """(promote?, reason) from the holdout metrics of challenger and champion."""
    metric = cfg.metric
    if challenger.get(metric) is None:
        raise DermrayError(f"nightly.metric: the holdout metrics have no '{metric}' (choose another metric)")
    sensitivity = malignant_sensitivity(challenger)
    if cfg.min_malignant_sensitivity > 0 and sensitivity is not None and sensitivity < cfg.min_malignant_sensitivity:
        return False, (f"challenger's malignant sensitivity {sensitivity:.3f} is below the floor "
                       f"{cfg.min_malignant_sensitivity:.3f}")
    if champion is None:
        return True, f"no champion yet: challenger {metric} {challenger[metric]:.4f}"
    ours, theirs = float(challenger[metric]), float(champion.get(metric, float("-inf")))
    if ours >= theirs + cfg.margin:
        return True, f"challenger {metric} {ours:.4f} >= champion {theirs:.4f} + margin {cfg.margin}"
    return False, f"challenger {metric} {ours:.4f} < champion {theirs:.4f} + margin {cfg.margin}"


def nightly(config: Config) -> dict:
    """One nightly cycle; returns the JSON summary (promoted, champion, challenger, reason, ...)."""
    cfg = config.nightly
    run_tracking.check_server(config)  # an unreachable tracking server: one line, before the registry is locked
    registry = Registry(cfg.registry)
    run = f"nightly-{utc_stamp()}-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    lock = registry.acquire(run, ttl_seconds=cfg.lock_ttl_hours * 3600)
    try:
        champion = registry.champion()
        champion_checkpoint = champion.record["checkpoint"] if champion else None
        fingerprint = source_fingerprint(cfg)
        seen = registry.data_state()
        if champion and seen and seen.get("digest") == fingerprint["digest"]:
            _log("no new or changed images since the last run; the champion stays")
            return {"promoted": False, "champion": champion_checkpoint, "challenger": None,
                    "reason": "no new or changed images since the last run", "run": None,
                    "registry": registry.root, "seconds": round(time.monotonic() - started, 1)}
        ensure_ray()
        _log(f"run {run}: re-staging {cfg.source} into {cfg.dataset}")
        staged = _stage(cfg, config.train.seed)
        manifest = manifest_uri(cfg.dataset)
        trained, warm = _train_challenger(config, run, manifest, staged["classes"], champion_checkpoint)
        challenger_checkpoint = trained["checkpoint"]
        reports = storage.join(registry.root, "reports", run)
        challenger_metrics = _holdout_metrics(challenger_checkpoint, manifest, cfg.holdout_split,
                                              storage.join(reports, "challenger"))
        champion_metrics = (_holdout_metrics(champion_checkpoint, manifest, cfg.holdout_split,
                                             storage.join(reports, "champion")) if champion else None)
        promote, reason = decide(cfg, challenger_metrics, champion_metrics)
        if promote:
            record = {"checkpoint": challenger_checkpoint, "run": run, "promoted_at": utc_stamp(),
                      "metric": cfg.metric, "holdout_metrics": challenger_metrics, "manifest": manifest,
                      "previous": champion_checkpoint}
            if registry.promote(record, replacing=champion):
                # MLflow's registry follows dermray's, never the other way round (a failure there is a warning).
                run_tracking.register_champion(config, trained)
            else:
                promote, reason = False, "another run replaced the champion first; keeping theirs"
        registry.record({
            "run": run, "promoted": promote, "reason": reason, "challenger": challenger_checkpoint,
            "champion_before": champion_checkpoint, "warm_start": warm, "metric": cfg.metric, "margin": cfg.margin,
            "challenger_metrics": challenger_metrics, "champion_metrics": champion_metrics,
            "images": staged["images"], "new_images": staged["images"] - (seen or {}).get("images", 0),
            "reports": reports, "decided_at": utc_stamp(),
        })
        registry.set_data_state({**fingerprint, "images": staged["images"], "run": run})
        _log(("promoted " if promote else "kept the champion: ") + reason)
        final = registry.champion()
        return {"promoted": promote, "champion": final.record["checkpoint"] if final else None,
                "challenger": challenger_checkpoint, "reason": reason, "run": run, "metric": cfg.metric,
                "challenger_metric": challenger_metrics.get(cfg.metric),
                "champion_metric": (champion_metrics or {}).get(cfg.metric), "reports": reports,
                "registry": registry.root, "seconds": round(time.monotonic() - started, 1)}
    finally:
        registry.release(lock)


def _train_challenger(config: Config, run: str, manifest: str, classes: list[str],
                      champion_checkpoint: str | None) -> tuple[dict, str | None]:
    """(the challenger's training summary, the champion checkpoint it warm-started from or None)."""
    warm = _warm_start(champion_checkpoint, config, classes)
    # The trainer sizes the images from the staged manifest's source (a nightly config names no manifest).
    train_config = config.model_copy(update={
        "data": config.data.model_copy(update={"manifest": manifest}),
        "model": config.model.model_copy(update={"init_checkpoint": warm, "weights": None if warm else
                                                 config.model.weights}),
        "run": config.run.model_copy(update={"name": run}),
    })
    _log(f"training challenger {run}" + (f" from the champion {warm}" if warm else ""))
    return train(train_config), warm
