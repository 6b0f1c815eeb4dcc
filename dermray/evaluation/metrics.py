"""Classification metrics over predicted probabilities, computed with scikit-learn (no Ray, no torch here).

Conventions, each decided once:

* The model's decision is the arg-max class. A coarse class's probability is the sum of its children's (Esteva);
  the malignant decision is P(malignant) >= 0.5.
* Macro one-vs-rest ROC AUC averages the AUC of every class present in the labels (with at least one negative);
  when every class is present this is scikit-learn's ``roc_auc_score(multi_class="ovr", average="macro")``, ISIC's
  official ``macro_average.auc`` (isic-challenge-scoring 5.6) and MedMNIST's ``getAUC`` (both of which fail
  instead when a class has no case). The melanoma AUC is the melanoma column's binary AUC: ISIC's
  ``per_category.auc.MEL``.
* Balanced accuracy follows ISIC's official definition (isic-challenge-scoring's
  ``balanced_multiclass_accuracy``): the mean, over the classes present in the labels, of each class's recall,
  where a case whose highest probability is shared by two classes is "undecided" and counts as wrong.
  scikit-learn's ``balanced_accuracy_score`` of the arg-max differs only there (it picks the first tied class).
* Accuracy is top-1 (arg-max) accuracy, MedMNIST's ``getACC`` for a multi-class task. ISIC's scorer has no such
  metric (its per-class "accuracy" is a one-vs-rest accuracy at 0.5).
* Expected calibration error: 15 equal-width bins of the top-class confidence, weighted by bin size.
* Confidence intervals: percentile bootstrap over cases (seeded; 200 resamples by default), 95%.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from dermray.taxonomy import MALIGNANT, coarse_probabilities

ECE_BINS = 15
OPERATING_POINTS = (0.80, 0.90, 0.95)


def _auc_or_none(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when the labels hold one class only (AUC is undefined)."""
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def macro_ovr_auc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """The mean one-vs-rest AUC over the classes of ``labels`` whose AUC is defined (see the module docstring)."""
    aucs = [_auc_or_none(labels == c, probs[:, c]) for c in np.unique(labels)]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def official_predicted(probs: np.ndarray) -> np.ndarray:
    """The arg-max class per case, -1 where the highest probability is shared (ISIC's "undecided")."""
    top = probs.max(axis=1, keepdims=True)
    return np.where((probs == top).sum(axis=1) > 1, -1, probs.argmax(axis=1))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """ISIC's balanced multi-class accuracy: the mean recall over the classes present in ``labels``, an undecided
    (tied) case never correct. A class absent from the labels has no recall and is left out, as ISIC does."""
    predicted = official_predicted(probs)
    return float(np.mean([(predicted[labels == c] == c).mean() for c in np.unique(labels)]))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram's data)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": [], "lower": [], "upper": []}
    for b in range(bins):
        members = which == b
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
        out["count"].append(int(members.sum()))
        out["confidence"].append(float(confidence[members].mean()) if members.any() else float("nan"))
        out["accuracy"].append(float(correct[members].mean()) if members.any() else float("nan"))
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    table = reliability(probs, labels, bins)
    total = max(len(labels), 1)
    return float(sum(n / total * abs(acc - conf) for conf, acc, n in
                     zip(table["confidence"], table["accuracy"], table["count"]) if n))


def sensitivity_at_specificity(positive: np.ndarray, scores: np.ndarray, specificity: float) -> float | None:
    """The highest sensitivity among thresholds whose specificity is at least ``specificity``."""
    if positive.all() or not positive.any():
        return None
    fpr, tpr, _ = roc_curve(positive, scores)
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def specificity_at_sensitivity(positive: np.ndarray, scores: np.ndarray, sensitivity: float) -> float | None:
    """The highest specificity among thresholds whose sensitivity is at least ``sensitivity``."""
    if positive.all() or not positive.any():
        return None
    fpr, tpr, _ = roc_curve(positive, scores)
    ok = tpr >= sensitivity - 1e-12
    return float((1.0 - fpr[ok]).max()) if ok.any() else 0.0


def _binary_rates(positive: np.ndarray, predicted: np.ndarray) -> tuple[float | None, float | None]:
    sensitivity = float(predicted[positive].mean()) if positive.any() else None
    specificity = float((~predicted[~positive]).mean()) if (~positive).any() else None
    return sensitivity, specificity


def malignant_scores(probs: np.ndarray, classes: list[str], tree: dict[str, list[str]] | None) -> np.ndarray | None:
    """P(malignant) per case through the taxonomy, or None when the tree has no malignant branch."""
    if not tree or not tree.get(MALIGNANT):
        return None
    return coarse_probabilities(probs, classes, tree)[MALIGNANT]


def malignant_labels(labels: np.ndarray, classes: list[str], tree: dict[str, list[str]]) -> np.ndarray:
    malignant = {classes.index(c) for c in tree[MALIGNANT] if c in classes}
    return np.isin(labels, list(malignant))


def _headline(probs: np.ndarray, labels: np.ndarray, classes: list[str], tree, melanoma: str | None
              ) -> dict[str, float | None]:
    predicted = probs.argmax(axis=1)
    out: dict[str, float | None] = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": balanced_accuracy(probs, labels),
        "roc_auc_ovr": macro_ovr_auc(probs, labels),
        "melanoma_auc": None,
        "malignant_auc": None,
    }
    if melanoma in classes:
        index = classes.index(melanoma)
        out["melanoma_auc"] = _auc_or_none(labels == index, probs[:, index])
    scores = malignant_scores(probs, classes, tree)
    if scores is not None:
        out["malignant_auc"] = _auc_or_none(malignant_labels(labels, classes, tree), scores)
    return out


def validation_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """The per-epoch validation metrics of training, computed as evaluation computes them, under the names the
    per-epoch reports use (``val_<name>``): accuracy, balanced_accuracy (ISIC's, ties never correct), loss (log
    loss) and roc_auc (the macro one-vs-rest AUC; absent when fewer than two classes are present)."""
    if len(labels) == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "loss": float("nan")}
    metrics = {
        "accuracy": float(accuracy_score(labels, probs.argmax(axis=1))),
        "balanced_accuracy": balanced_accuracy(probs, labels),
        "loss": float(log_loss(labels, np.clip(probs, 1e-7, 1.0), labels=list(range(num_classes)))),
    }
    auc = macro_ovr_auc(probs, labels)
    if auc is not None:
        metrics["roc_auc"] = auc
    return metrics


def bootstrap_intervals(
    probs: np.ndarray, labels: np.ndarray, headline: Callable[[np.ndarray, np.ndarray], dict],
    resamples: int = 200, seed: int = 0, level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap interval of every headline metric (resampling cases; undefined draws skipped)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        # A resample may miss a rare class that is still predicted; scikit-learn warns each time, expectedly.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        for _ in range(resamples):
            pick = rng.integers(0, len(labels), len(labels))
            for name, value in headline(probs[pick], labels[pick]).items():
                if value is not None:
                    draws.setdefault(name, []).append(value)
    tail = (1.0 - level) / 2 * 100
    names = headline(probs, labels).keys()
    return {name: [float(np.percentile(draws[name], tail)), float(np.percentile(draws[name], 100 - tail))]
            if len(draws.get(name, [])) >= 10 else None for name in names}


def evaluate_predictions(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], tree: dict[str, list[str]] | None = None,
    melanoma: str | None = None, bootstrap: int = 200, seed: int = 0,
) -> dict:
    """Every metric of the evaluation report, as JSON-ready values (None where undefined)."""
    if len(labels) == 0:
        raise ValueError("no predictions to evaluate")
    k = len(classes)
    predicted = probs.argmax(axis=1)

    def headline(p: np.ndarray, y: np.ndarray) -> dict:
        return _headline(p, y, classes, tree, melanoma)

    metrics: dict = {"images": int(len(labels)), **headline(probs, labels)}
    metrics["log_loss"] = float(log_loss(labels, np.clip(probs, 1e-7, 1.0), labels=list(range(k))))
    metrics["ece"] = expected_calibration_error(probs, labels)
    metrics["ece_bins"] = ECE_BINS
    matrix = confusion_matrix(labels, predicted, labels=list(range(k)))
    metrics["confusion_matrix"] = {"classes": classes, "matrix": matrix.tolist(), "rows": "true",
                                   "columns": "predicted"}
    sensitivity = recall_score(labels, predicted, labels=list(range(k)), average=None, zero_division=0)
    precision = precision_score(labels, predicted, labels=list(range(k)), average=None, zero_division=0)
    per_class = {}
    for c, name in enumerate(classes):
        negatives = matrix.sum() - matrix[c].sum()
        true_negatives = negatives - (matrix[:, c].sum() - matrix[c, c])
        per_class[name] = {
            "support": int(matrix[c].sum()),
            "sensitivity": float(sensitivity[c]) if matrix[c].sum() else None,
            "specificity": float(true_negatives / negatives) if negatives else None,
            "precision": float(precision[c]) if matrix[:, c].sum() else None,
            "auc": _auc_or_none(labels == c, probs[:, c]),
        }
    metrics["per_class"] = per_class

    scores = malignant_scores(probs, classes, tree)
    if scores is not None:
        positive = malignant_labels(labels, classes, tree)
        sens, spec = _binary_rates(positive, scores >= 0.5)
        metrics["malignant"] = {
            "classes": tree[MALIGNANT], "threshold": 0.5, "support": int(positive.sum()),
            "auc": metrics["malignant_auc"], "sensitivity": sens, "specificity": spec,
            "sensitivity_at_specificity": {f"{s:.2f}": sensitivity_at_specificity(positive, scores, s)
                                           for s in OPERATING_POINTS},
            "specificity_at_sensitivity": {f"{s:.2f}": specificity_at_sensitivity(positive, scores, s)
                                           for s in OPERATING_POINTS},
        }
    else:
        metrics["malignant"] = None
    metrics["confidence_intervals"] = bootstrap_intervals(probs, labels, headline, bootstrap, seed) if bootstrap else {}
    metrics["bootstrap_resamples"] = bootstrap
    return metrics
