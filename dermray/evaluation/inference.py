"""Batch inference as a Ray Data job: decoded uint8 batches in, class probabilities (and optionally the
penultimate-layer features) out, from an actor pool that loads the model once per actor (one actor per GPU when
the cluster has GPUs). Used by ``evaluate``, ``predict`` and ``explain``.

Test-time augmentation averages the softmax over the first N of the 8 dihedral views of each image (identity,
flips, transposes and quarter turns): dermoscopy has no canonical orientation, so every view is a plausible
photograph of the same lesion.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import ray.data
import torch

from dermray.data.ingest import normalize_on_device
from dermray.models.backbones import captured_head_inputs, split_logits
from dermray.models.checkpoint import InferenceModel, load_for_inference
from dermray.train.engine import autocast_for

TTA_VIEWS = 8


def dihedral_view(images: torch.Tensor, index: int) -> torch.Tensor:
    """View ``index`` (0-7) of the dihedral group of a square NHWC batch; 0 is the identity."""
    if index >= 4:
        images = images.transpose(1, 2)  # swap H and W: the transpose, then its flips
    if index % 4 in (1, 3):
        images = images.flip(2)  # horizontal flip (W axis)
    if index % 4 in (2, 3):
        images = images.flip(1)  # vertical flip (H axis)
    return images


@torch.no_grad()
def predict_probabilities(loaded: InferenceModel, images: torch.Tensor, tta: int = 1,
                          features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(softmax probabilities (N, K) averaged over ``tta`` views, penultimate features (N, D) of the identity
    view or None) for a uint8 NHWC batch."""
    device = next(loaded.model.parameters()).device
    # The input of the final classifier Linear is the penultimate representation, for every backbone.
    capture = captured_head_inputs(loaded.model, loaded.backbone) if features else nullcontext([])
    with capture as captured:
        total = None
        images = images.to(device, non_blocking=True)
        for view in range(max(1, min(tta, TTA_VIEWS))):
            x = normalize_on_device(dihedral_view(images, view), device, channels_last=device.type == "cuda")
            with autocast_for(device, "auto"):
                logits, _ = split_logits(loaded.model(x))
            probs = torch.softmax(logits.float(), dim=1)
            total = probs if total is None else total + probs
    averaged = (total / max(1, min(tta, TTA_VIEWS))).cpu().numpy()
    return averaged, (captured[0].float().flatten(1).cpu().numpy() if features else None)


class Predictor:
    """The Ray Data actor: ``map_batches(Predictor, compute=ActorPoolStrategy(...), fn_constructor_kwargs=...)``.
    Rows with a non-empty ``error`` column (unreadable images) get NaN probabilities instead of a prediction.
    Several checkpoints (members of an ensemble that see images alike) give the mean of their probabilities."""

    def __init__(self, checkpoint: str | list[str], tta: int = 1, features: bool = False):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoints = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
        if features and len(checkpoints) > 1:
            raise ValueError("features come from one model, not an ensemble")
        self.members = [load_for_inference(c, device) for c in checkpoints]
        self.tta = tta
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "image"}
        n, k = len(batch["image"]), len(self.members[0].classes)
        good = np.array([not e for e in batch["error"]]) if "error" in batch else np.ones(n, bool)
        probs = np.full((n, k), np.nan, np.float32)
        feats = None
        if good.any():
            images = torch.from_numpy(batch["image"][good])
            results = [predict_probabilities(member, images, self.tta, self.features) for member in self.members]
            probs[good] = np.mean([p for p, _ in results], axis=0)
            f = results[0][1]
            if f is not None:
                feats = np.full((n, f.shape[1]), np.nan, np.float32)
                feats[good] = f
        out["probs"] = probs
        if self.features:
            out["features"] = feats if feats is not None else np.full((n, 1), np.nan, np.float32)
        return out


def actor_pool(cluster_resources: dict) -> dict:
    """map_batches arguments for the predictor actors: one per GPU when there are GPUs; on CPU clusters half the
    CPUs (the other half decodes images), at least one."""

    gpus = int(cluster_resources.get("GPU", 0))
    if gpus:
        return {"compute": ray.data.ActorPoolStrategy(size=gpus), "num_gpus": 1}
    cpus = int(cluster_resources.get("CPU", 1))
    return {"compute": ray.data.ActorPoolStrategy(size=max(1, cpus // 2)), "num_cpus": 1}
