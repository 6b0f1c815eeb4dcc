"""The evaluation and explanation figures, as PNG bytes (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray, float | None, tuple[float, float] | None]],
               title: str) -> bytes:
    """ROC curves: (name, positive labels, scores, AUC, operating point (1 - specificity, sensitivity))."""
    figure, axes = plt.subplots(figsize=(6, 6))
    for name, positive, scores, auc, point in curves:
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, scores)
        line = axes.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)[0]
        if point is not None:
            axes.plot(*point, "o", color=line.get_color(), ms=7, mec="black")
    axes.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    axes.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
             xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.legend(loc="lower right", fontsize=8, title="dot: the model's operating point", title_fontsize=8)
    axes.grid(alpha=0.3)
    return _png(figure)


def confusion_figure(matrix: np.ndarray, classes: list[str]) -> bytes:
    """Row-normalised confusion matrix (colour: fraction of the true class), with the counts written in."""
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    size = max(4.0, 0.7 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            axes.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9,
                      color="white" if fraction[i, j] > 0.5 else "black")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="predicted", ylabel="true", title="confusion matrix (counts; colour: share of the true class)")
    return _png(figure)


def reliability_figure(table: dict[str, list[float]], ece: float) -> bytes:
    """Reliability diagram: accuracy against mean confidence per bin, bar width = bin, with the count."""
    figure, axes = plt.subplots(figsize=(6, 6))
    lower, upper = np.array(table["lower"]), np.array(table["upper"])
    accuracy = np.nan_to_num(np.array(table["accuracy"], dtype=float))
    counts = np.array(table["count"])
    axes.bar(lower, accuracy, width=upper - lower, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    confidence = np.array(table["confidence"], dtype=float)
    present = counts > 0
    axes.plot(confidence[present], accuracy[present], "o", color="darkred", ms=4, label="bin mean confidence")
    axes.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for left, width, height, n in zip(lower, upper - lower, accuracy, counts):
        if n:
            axes.text(left + width / 2, min(height + 0.02, 0.97), str(n), ha="center", fontsize=7)
    axes.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
             title=f"reliability (ECE {ece:.3f}; numbers: images per bin)")
    axes.legend(loc="upper left", fontsize=8)
    return _png(figure)


def tsne_figure(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str) -> bytes:
    figure, axes = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        members = labels == c
        if members.any():
            axes.scatter(points[members, 0], points[members, 1], s=12, alpha=0.8, color=colours(c), label=name)
    axes.set(title=title, xticks=[], yticks=[])
    axes.legend(fontsize=8, markerscale=1.5, loc="best")
    return _png(figure)


def saliency_grid_figure(rows: list[tuple[str, list[tuple[np.ndarray, np.ndarray, str]]]]) -> bytes:
    """One row per class: each example as the image, then the saliency map overlaid on it.
    ``rows``: (class name, [(uint8 HxWx3 image, HxW map in [0, 1], caption), ...])."""
    columns = max((len(examples) for _, examples in rows), default=1) * 2
    # Constrained layout: the default margins are fractions of the height, which leaves a tall grid's title
    # floating far above its first row.
    figure, grid = plt.subplots(len(rows), columns, figsize=(1.7 * columns, 1.9 * len(rows)), squeeze=False,
                                layout="constrained")
    for r, (name, examples) in enumerate(rows):
        for c in range(columns):
            grid[r][c].axis("off")
        for e, (image, saliency, caption) in enumerate(examples):
            grid[r][2 * e].imshow(image)
            grid[r][2 * e].set_title(caption, fontsize=7)
            grid[r][2 * e + 1].imshow(image)
            grid[r][2 * e + 1].imshow(saliency, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        grid[r][0].text(-0.08, 0.5, name, transform=grid[r][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=10)
    figure.suptitle("saliency: L1 norm over RGB of the loss gradient at the input (Esteva et al. 2017)", fontsize=9)
    return _png(figure)
