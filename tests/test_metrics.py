"""Metrics against scikit-learn and hand-computed values on known inputs, and the taxonomy's coarse sums."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermray.evaluation.metrics import (
    evaluate_predictions,
    expected_calibration_error,
    macro_ovr_auc,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)
from dermray.taxonomy import coarse_probabilities, infer_taxonomy, melanoma_class, taxonomy_names, taxonomy_tree

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture
def predictions():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(7), 30)
    logits = rng.normal(size=(len(labels), 7))
    logits[np.arange(len(labels)), labels] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def test_headline_metrics_match_scikit_learn(predictions):
    probs, labels = predictions
    m = evaluate_predictions(probs, labels, HAM, taxonomy_tree("ham10000", HAM), "mel", bootstrap=0)
    assert m["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["melanoma_auc"] == pytest.approx(roc_auc_score(labels == 4, probs[:, 4]))
    malignant = probs[:, [0, 1, 4]].sum(axis=1)
    assert m["malignant_auc"] == pytest.approx(roc_auc_score(np.isin(labels, [0, 1, 4]), malignant))
    assert m["per_class"]["nv"]["auc"] == pytest.approx(roc_auc_score(labels == 5, probs[:, 5]))
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == len(labels)


def test_per_class_rates_on_a_hand_made_confusion():
    # 3 classes; true 0 0 0 1 1 2, predicted 0 0 1 1 2 2
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), predicted] = 0.8
    m = evaluate_predictions(probs, labels, ["a", "b", "c"], bootstrap=0)
    assert m["confusion_matrix"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["a"] == pytest.approx(
        {"support": 3, "sensitivity": 2 / 3, "specificity": 1.0, "precision": 1.0,
         "auc": m["per_class"]["a"]["auc"]})
    assert m["per_class"]["b"]["sensitivity"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)  # one of the four non-b predicted b
    assert m["per_class"]["c"]["precision"] == pytest.approx(0.5)
    assert m["malignant"] is None and m["malignant_auc"] is None  # no taxonomy given


def test_expected_calibration_error_known_values():
    # Every prediction 0.8 confident; 80% right -> perfectly calibrated; 50% right -> ECE 0.3.
    probs = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(probs, np.array([0] * 8 + [1] * 2)) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.3)


def test_operating_points():
    positive = np.array([True, True, True, True, False, False, False, False])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05])
    # Threshold 0.7 catches 3/4 positives with 1.0 specificity; to catch all 4 (threshold 0.2), one negative
    # (0.6) and another (0.3) score above it: specificity 2/4.
    assert sensitivity_at_specificity(positive, scores, 1.0) == pytest.approx(0.75)
    assert specificity_at_sensitivity(positive, scores, 1.0) == pytest.approx(0.5)
    assert sensitivity_at_specificity(np.ones(3, bool), np.ones(3), 0.9) is None


def test_bootstrap_intervals_bracket_the_estimate(predictions):
    probs, labels = predictions
    m = evaluate_predictions(probs, labels, HAM, taxonomy_tree("ham10000", HAM), "mel", bootstrap=200, seed=1)
    for name in ("accuracy", "balanced_accuracy", "roc_auc_ovr", "melanoma_auc", "malignant_auc"):
        low, high = m["confidence_intervals"][name]
        assert low < m[name] < high, name
        assert high - low < 0.25
    again = evaluate_predictions(probs, labels, HAM, taxonomy_tree("ham10000", HAM), "mel", bootstrap=200, seed=1)
    assert again["confidence_intervals"] == m["confidence_intervals"]  # seeded


def test_auc_skips_classes_absent_from_the_labels():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    assert macro_ovr_auc(probs, labels) == pytest.approx(1.0)


def test_taxonomy_trees_and_coarse_sums():
    assert set(taxonomy_names()) >= {"ham10000", "isic2019", "isic2020", "synthetic"}
    tree = taxonomy_tree("ham10000", HAM)
    assert tree == {"malignant": ["akiec", "bcc", "mel"], "benign": ["bkl", "df", "nv", "vasc"]}
    probs = np.array([[0.1, 0.2, 0.05, 0.05, 0.3, 0.25, 0.05]])
    coarse = coarse_probabilities(probs, HAM, tree)
    assert coarse["malignant"][0] == pytest.approx(0.6) and coarse["benign"][0] == pytest.approx(0.4)
    assert infer_taxonomy(["mel", "nv"]) == "ham10000"
    assert infer_taxonomy(["ak", "scc", "nv"]) == "isic2019"
    assert infer_taxonomy(["cat", "dog"]) is None
    assert melanoma_class("isic2020", ["benign", "malignant"]) == "malignant"
    assert taxonomy_tree("isic2019", ["mel", "nv"]) == {"malignant": ["mel"], "benign": ["nv"]}


def test_balanced_accuracy_counts_a_tied_top_probability_as_wrong_as_isic_does():
    # ISIC's balanced_multiclass_accuracy labels a row whose maximum is shared "undecided" (never correct);
    # scikit-learn's arg-max would credit the first tied class.
    from dermray.evaluation.metrics import balanced_accuracy

    probs = np.array([[0.5, 0.5, 0.0], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    labels = np.array([0, 1, 2, 0])
    assert balanced_accuracy_score(labels, probs.argmax(1)) == pytest.approx(1.0)
    assert balanced_accuracy(probs, labels) == pytest.approx((0.5 + 1 + 1) / 3)
    m = evaluate_predictions(probs, labels, ["a", "b", "c"], bootstrap=0)
    assert m["balanced_accuracy"] == pytest.approx(0.5 / 3 + 2 / 3)
