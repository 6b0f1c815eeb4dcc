"""``dermray explain``: what the model looks at, and how it organises the lesions (Esteva et al. 2017, Fig. 4).

* Saliency maps: for a few images of each class, the L1 norm over RGB of the gradient of the loss (with the
  true label) with respect to the input pixels, shown beside the image and overlaid on it (``saliency.png``).
* t-SNE: the penultimate-layer features of the split's images (a Ray Data inference job), embedded in 2-D with
  scikit-learn's t-SNE and coloured by the true class (``tsne.png``, coordinates in ``tsne.csv``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.manifold import TSNE

from dermray import storage
from dermray.data.imaging import UnreadableImage, decode_rgb
from dermray.data.ingest import normalize_on_device
from dermray.data.manifest import read_manifest
from dermray.data.transforms import decode_size_hint
from dermray.errors import DermrayError
from dermray.evaluation.evaluate import predict_split
from dermray.evaluation.plots import saliency_grid_figure, tsne_figure
from dermray.models.backbones import split_logits
from dermray.models.checkpoint import InferenceModel, load_for_inference


def saliency_map(loaded: InferenceModel, image: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """(HxW saliency in [0, 1], the class probabilities) for one uint8 HxWx3 image: |d loss / d input| summed
    over RGB, scaled by its 99th percentile so one hot pixel does not wash out the map."""


    device = next(loaded.model.parameters()).device
    x = normalize_on_device(torch.from_numpy(image)[None], device, channels_last=False).requires_grad_(True)
    logits, _ = split_logits(loaded.model(x))
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([label], device=device))
    loaded.model.zero_grad(set_to_none=True)
    loss.backward()
    saliency = x.grad.detach().abs().sum(dim=1)[0].cpu().numpy()
    scale = np.percentile(saliency, 99) or saliency.max() or 1.0
    return np.clip(saliency / scale, 0.0, 1.0), torch.softmax(logits.detach().float(), dim=1)[0].cpu().numpy()


def saliency_examples(loaded: InferenceModel, manifest, split: str, per_class: int) -> list:
    """The first ``per_class`` readable images of every class of the split, with their saliency maps."""
    preset = loaded.preset
    table = manifest.split(split)
    rows = []
    for c, name in enumerate(loaded.classes):
        uris = [u for u, lab in zip(table["image_uri"].to_pylist(), table["label"].to_pylist()) if lab == c]
        examples = []
        for uri in uris:
            if len(examples) == per_class:
                break
            try:
                image = preset(decode_rgb(storage.read_bytes(uri), min_side=decode_size_hint(preset)))
            except (UnreadableImage, FileNotFoundError):
                continue
            saliency, probs = saliency_map(loaded, image, c)
            guess = loaded.classes[int(probs.argmax())]
            examples.append((image, saliency, f"p({name})={probs[c]:.2f}" + ("" if guess == name else f" ->{guess}")))
        if examples:
            rows.append((name, examples))
    return rows


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def explain(checkpoint: str, manifest: str, out: str | None = None, split: str = "test", per_class: int = 3,
            tsne_images: int = 2000) -> dict:
    started = time.monotonic()
    loaded_manifest = read_manifest(manifest)
    out = storage.normalize(out or storage.join(storage.normalize(checkpoint), f"explain-{split}"))
    loaded = load_for_inference(checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    if loaded.classes != loaded_manifest.classes:
        raise DermrayError(f"explain: the checkpoint was trained on classes {loaded.classes}, the manifest has "
                           f"{loaded_manifest.classes}")
    rows = saliency_examples(loaded, loaded_manifest, split, per_class)
    if not rows:
        raise DermrayError(f"explain: no readable image in split '{split}'")
    saliency_uri = storage.write_bytes(storage.join(out, "saliency.png"), saliency_grid_figure(rows))

    result = predict_split(checkpoint, loaded_manifest, split, features=True, limit=tsne_images)
    if len(result.labels) < 5:
        raise DermrayError(f"explain: t-SNE needs at least 5 images in split '{split}', found {len(result.labels)}")
    points = tsne_embedding(result.features)
    tsne_uri = storage.write_bytes(storage.join(out, "tsne.png"), tsne_figure(
        points, result.labels, result.classes,
        f"t-SNE of the {result.features.shape[1]}-d penultimate features ({len(points)} {split} images)"))
    lines = ["image_uri,label,x,y"] + [f"{u},{result.classes[lab]},{x:.4f},{y:.4f}"
                                       for u, lab, (x, y) in zip(result.image_uris, result.labels, points)]
    storage.write_text(storage.join(out, "tsne.csv"), "\n".join(lines) + "\n")
    return {"saliency": saliency_uri, "tsne": tsne_uri, "tsne_points": storage.join(out, "tsne.csv"),
            "saliency_examples": sum(len(e) for _, e in rows), "tsne_images": int(len(points)),
            "feature_dim": int(result.features.shape[1]), "out": out, "seconds": round(time.monotonic() - started, 1)}
