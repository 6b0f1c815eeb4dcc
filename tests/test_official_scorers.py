"""dermray's metrics.json against the official scorers, on real data and real dermray predictions:

* ISIC's own scoring code (``isic-challenge-scoring`` 5.6.0, the package the ISIC challenges score with) on the
  ``isic_submission.csv`` that ``dermray evaluate`` writes for the real ISIC 2018 Task 3 test images, against the
  official one-hot ground truth built from ``isic2018-sample/labels.csv``: balanced accuracy, macro AUC, melanoma AUC.
* MedMNIST's evaluator functions (``medmnist.evaluator.getACC`` / ``getAUC``, medmnist 3.0.2, the functions its
  ``Evaluator`` calls) on dermray's predictions for the DermaMNIST val split, in the npz's own order and labels:
  accuracy and macro AUC. (ISIC's scorer has no top-1 accuracy; MedMNIST's is the reference for it.)

isic-challenge-scoring 5.6.0 calls ``DataFrame.applymap`` while parsing every submission, which pandas 3 removed
(checked: ``AttributeError: 'DataFrame' object has no attribute 'applymap'``), and the project runs on pandas 3. So
it runs in a venv of its own with pandas 2, through its command line, as a challenge organiser would run it. The
venv is kept under ~/.cache/dermray-test-scorers/<hash of the pinned requirements> so reruns on one machine take no
time; a fresh one is built (about 20 s) when that is absent or broken, or always with DERMRAY_TEST_SCORERS_FRESH=1.
The scores never depend on the cache: the requirements are pinned and the key is their hash.

Each comparison is shown to bite: a perturbed prediction set moves the official score away from metrics.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermray.data.manifest import read_manifest
from dermray.evaluation.evaluate import evaluate, image_id
from tests.conftest import data_path

pytestmark = pytest.mark.slow

ISIC_SCORER_REQUIREMENTS = ("isic-challenge-scoring==5.6.0", "pandas==2.3.3")
ISIC2018_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
TOLERANCE = 1e-3
UNREACHABLE = ("No matching distribution", "Could not find a version", "Failed to establish a new connection",
               "Network is unreachable", "Temporary failure in name resolution")


def _build_scorer_venv(target: Path) -> None:
    """A venv at ``target`` with the pinned scorer requirements; skips the test when pip cannot reach them."""
    building = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True, timeout=300)
    pip = subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", *ISIC_SCORER_REQUIREMENTS],
                         capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        reason = pip.stderr.strip().splitlines()[-1:] or ["(no output)"]
        if any(marker in pip.stderr for marker in UNREACHABLE):
            pytest.skip(f"pip cannot install {' '.join(ISIC_SCORER_REQUIREMENTS)}: {reason[0]}")
        raise AssertionError(f"pip install of the ISIC scorer failed:\n{pip.stderr[-3000:]}")
    if _works(target):  # another test session finished the same venv meanwhile: keep that one
        shutil.rmtree(building, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)  # whole or absent: an interrupted build never looks like a usable cache


def _works(venv: Path) -> bool:
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import isic_challenge_scoring, pandas"],
                           capture_output=True, timeout=120) if (venv / "bin" / "python").exists() else None
    return probe is not None and probe.returncode == 0


@pytest.fixture(scope="session")
def isic_scorer(tmp_path_factory) -> Path:
    """The Python of a venv with the pinned scorer requirements (cached per machine). The scorer runs as
    ``python -m isic_challenge_scoring`` (its command line): the venv is built elsewhere and renamed into place,
    which leaves the console scripts' shebangs pointing at the old path."""
    key = hashlib.sha256(" ".join((sys.version.split()[0], *ISIC_SCORER_REQUIREMENTS)).encode()).hexdigest()[:16]
    if os.environ.get("DERMRAY_TEST_SCORERS_FRESH"):
        venv = tmp_path_factory.mktemp("isic-scorer") / "venv"
    else:
        venv = Path.home() / ".cache" / "dermray-test-scorers" / key
        venv.parent.mkdir(parents=True, exist_ok=True)
    if not _works(venv):
        _build_scorer_venv(venv)
    return venv / "bin" / "python"


def isic_score(scorer: Path, truth: Path, submission: Path) -> dict:
    """The official scorer's JSON output for a classification submission."""
    result = subprocess.run([str(scorer), "-m", "isic_challenge_scoring", "-o", "json", "classification",
                             str(truth), str(submission)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def isic2018_truth(image_ids: list[str], path: Path) -> Path:
    """The official ISIC 2018 Task 3 ground-truth layout (image + one-hot float columns) for ``image_ids``, from
    the sample's labels.csv (the dx codes of the official ground truth)."""
    labels = pd.read_csv(data_path("isic2018-sample", "labels.csv")).set_index("image_id").loc[image_ids, "dx"]
    truth = pd.DataFrame({"image": image_ids})
    for column in ISIC2018_COLUMNS:
        truth[column] = (labels.to_numpy() == column.lower()).astype(float)
    truth.to_csv(path, index=False)
    return path


def _official_isic(score: dict) -> dict[str, float]:
    return {"balanced_accuracy": score["aggregate"]["balanced_accuracy"],
            "roc_auc_ovr": score["macro_average"]["auc"], "melanoma_auc": score["per_category"]["auc"]["MEL"]}


def test_isic_official_scorer_agrees_with_metrics_json(isic_checkpoint, isic2018_manifest_local, isic_scorer,
                                                       tmp_path):
    from medmnist.evaluator import getACC

    summary = evaluate(isic_checkpoint, isic2018_manifest_local, "test", str(tmp_path / "eval"), bootstrap=0)
    metrics = json.loads(Path(summary["metrics_file"]).read_text())
    written = summary["outputs"]["isic_submission"]
    assert written["challenge"] == "ISIC 2018 Task 3" and written["unreadable_left_out"] == 0
    submission_path = Path(written["file"])
    assert submission_path == tmp_path / "eval" / "isic_submission.csv"
    submission = pd.read_csv(submission_path)
    assert list(submission.columns) == ["image", *ISIC2018_COLUMNS]
    assert len(submission) == written["rows"] == metrics["images"]
    assert submission["image"].str.fullmatch(r"ISIC_\d{7}").all()
    probs = submission[ISIC2018_COLUMNS].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    # The ground truth covers the manifest's test split, independently of what the submission lists: a missing or
    # extra row makes the official scorer refuse it.
    test_ids = [image_id(u) for u in read_manifest(isic2018_manifest_local).split("test")["image_uri"].to_pylist()]
    truth = isic2018_truth(sorted(test_ids), tmp_path / "truth.csv")
    official = _official_isic(isic_score(isic_scorer, truth, submission_path))
    print("ISIC agreement (dermray, official):", {k: (metrics[k], v) for k, v in official.items()})
    for name, value in official.items():
        assert metrics[name] == pytest.approx(value, abs=TOLERANCE), name
    assert metrics["roc_auc_ovr"] != 0.5 and metrics["melanoma_auc"] != 0.5  # the model ranks cases: not vacuous

    # Top-1 accuracy: ISIC's scorer has none (its per-class "accuracy" is one-vs-rest at 0.5); MedMNIST's getACC.
    truth_labels = pd.read_csv(truth).set_index("image").loc[submission["image"], ISIC2018_COLUMNS].to_numpy()
    top1 = getACC(truth_labels.argmax(1), probs, "multi-class")
    print("accuracy (dermray, medmnist getACC):", (metrics["accuracy"], top1))
    assert metrics["accuracy"] == pytest.approx(top1, abs=TOLERANCE)

    # The comparison bites. (a) Scores that rank every image's true class last (zero there, the rest shared): every
    # class's AUC falls to 0, whatever the model learnt. (Rows shuffled against their images move the AUCs only by
    # chance: a weak model's 0.667 once landed within 0.0003 of its shuffle's.) (b) One correctly classified case made
    # wrong (its top probability swapped with another class's): balanced accuracy moves by 1/(classes x that class's
    # support), well above the tolerance on a split of this size.
    inverted = submission.copy()
    inverted[ISIC2018_COLUMNS] = (1.0 - truth_labels) / (len(ISIC2018_COLUMNS) - 1)
    inverted.to_csv(tmp_path / "inverted.csv", index=False)
    moved = _official_isic(isic_score(isic_scorer, truth, tmp_path / "inverted.csv"))
    for name in ("roc_auc_ovr", "melanoma_auc"):
        assert moved[name] == pytest.approx(0.0, abs=TOLERANCE), name
        assert metrics[name] > 0.1, name
    correct = np.flatnonzero(probs.argmax(1) == truth_labels.argmax(1))
    assert correct.size, "the model classifies no test case correctly"
    row, top = correct[0], probs[correct[0]].argmax()
    other = (top + 1) % len(ISIC2018_COLUMNS)
    wrong = submission.copy()
    wrong.iloc[row, [1 + top, 1 + other]] = probs[row, [other, top]]
    wrong.to_csv(tmp_path / "wrong.csv", index=False)
    worse = _official_isic(isic_score(isic_scorer, truth, tmp_path / "wrong.csv"))
    assert metrics["balanced_accuracy"] - worse["balanced_accuracy"] > TOLERANCE


@pytest.fixture(scope="module")
def dermamnist_run(ray_local, tmp_path_factory) -> dict:
    """A tiny small_cnn trained at 28 px on the first 1,500 real DermaMNIST training images, then evaluated on the
    whole real val split (1,003 images): the npz is subset, not the images altered."""
    from dermray.config import load_config
    from dermray.data.sources import SourceOptions
    from dermray.data.stage import stage
    from dermray.train.trainer import train

    root = tmp_path_factory.mktemp("dermamnist")
    arrays = np.load(data_path("dermamnist", "dermamnist_28_trainval.npz"))
    npz = root / "dermamnist_subset.npz"  # "derma" in the name: staged with the DermaMNIST class names
    np.savez(npz, train_images=arrays["train_images"][:1500], train_labels=arrays["train_labels"][:1500],
             val_images=arrays["val_images"], val_labels=arrays["val_labels"])
    manifest = stage("medmnist", SourceOptions(out=str(root / "store"), npz=str(npz)))["manifest"]
    trained = train(load_config(None, [
        f"data.manifest={manifest}", f"run.storage={root / 'runs'}", "run.name=dermamnist",
        "model.backbone=small_cnn", "model.image_size=28", "train.epochs=2", "train.batch_size=64",
    ]))
    summary = evaluate(trained["checkpoint"], manifest, "val", str(root / "eval"), bootstrap=0)
    return {"summary": summary, "val_labels": arrays["val_labels"]}


def test_medmnist_evaluator_agrees_with_metrics_json(dermamnist_run):
    from medmnist.evaluator import getACC, getAUC
    from medmnist.info import INFO

    summary = dermamnist_run["summary"]
    metrics = json.loads(Path(summary["metrics_file"]).read_text())
    table = pd.read_parquet(Path(summary["out"]) / "predictions.parquet")
    classes = list(INFO["dermamnist"]["label"].values())  # medmnist's own class order
    assert len(classes) == 7
    # Back into the npz's order by the staged file name (val/000123.png is val image 123), scored against the npz's
    # own labels, not dermray's: what MedMNIST's Evaluator does with its split's labels.
    order = table["image_uri"].map(lambda u: int(image_id(u))).to_numpy()
    assert sorted(order) == list(range(len(dermamnist_run["val_labels"])))
    y_score = np.zeros((len(order), 7))
    y_score[order] = table[[f"p_{c}" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")]].to_numpy()
    y_true = dermamnist_run["val_labels"]
    official = {"accuracy": getACC(y_true, y_score, INFO["dermamnist"]["task"]),
                "roc_auc_ovr": getAUC(y_true, y_score, INFO["dermamnist"]["task"])}
    print("MedMNIST agreement (dermray, official):", {k: (metrics[k], v) for k, v in official.items()})
    for name, value in official.items():
        assert metrics[name] == pytest.approx(value, abs=TOLERANCE), name
    assert metrics["roc_auc_ovr"] > 0.6  # the model learned something: the AUC comparison is not vacuous

    shuffled = y_score[np.random.default_rng(0).permutation(len(y_score))]
    assert abs(getAUC(y_true, shuffled, "multi-class") - metrics["roc_auc_ovr"]) > TOLERANCE
    flipped = y_score.copy()
    flipped[:, [5, 0]] = y_score[:, [0, 5]]  # nv <-> akiec: every nv call becomes wrong
    assert metrics["accuracy"] - getACC(y_true, flipped, "multi-class") > TOLERANCE


def test_the_submission_leaves_out_rows_without_a_prediction_and_fills_a_missing_optional_class():
    from dermray.evaluation.evaluate import SplitPredictions, isic_submission
    from dermray.taxonomy import isic_format

    classes = ["ak", "bcc", "bkl", "df", "mel", "nv", "scc", "vasc"]  # ISIC 2019 without UNK, in staging's order
    probs = np.full((3, 8), 1 / 8, np.float32)
    probs[1] = np.nan  # what the predictor returns for an image it could not read
    probs[2] = np.eye(8, dtype=np.float32)[classes.index("scc")]
    result = SplitPredictions([f"s3://b/img/ISIC_000000{i}.jpg" for i in range(3)], np.zeros(3, int), probs, None,
                              classes, None, "mel", dropped=2)
    layout = isic_format(classes)
    assert layout is not None and layout.challenge == "ISIC 2019"
    csv, left_out = isic_submission(result, layout)
    table = pd.read_csv(io.StringIO(csv))
    assert left_out == 1 and list(table["image"]) == ["ISIC_0000000", "ISIC_0000002"]
    assert list(table.columns) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert (table["UNK"] == 0).all() and np.allclose(table.iloc[:, 1:].sum(axis=1), 1.0)
    assert table.loc[1, "SCC"] == 1.0 and table.loc[1, "MEL"] == 0.0
    assert isic_format(["benign", "malignant"]) is None  # ISIC 2020's binary target: no per-class submission
    assert isic_format([*classes, "other"]) is None  # a class with no official column: the scorer would refuse it
