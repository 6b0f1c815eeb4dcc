"""evaluate / predict / explain end to end on a checkpoint trained in the session on the real ISIC 2018 sample,
on the session's real local Ray instance; outputs go to the S3 endpoint on loopback where noted, and one test
goes through the command line for the JSON-line contract."""

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermray import storage
from dermray.data.manifest import read_manifest
from dermray.errors import DermrayError
from dermray.evaluation.evaluate import evaluate, trained_on_split
from dermray.evaluation.explain import explain
from dermray.evaluation.predict import predict

pytestmark = pytest.mark.slow
HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MALIGNANT = ["akiec", "bcc", "mel"]


def test_evaluate_writes_metrics_plots_and_report_to_s3(isic_checkpoint, isic2018_manifest_local, bucket):
    out = f"s3://{bucket}/eval-test"
    summary = evaluate(isic_checkpoint, isic2018_manifest_local, "test", out, bootstrap=50)
    for name in ("metrics.json", "report.html", "roc_per_class.png", "roc_malignant.png", "confusion.png",
                 "reliability.png", "predictions.parquet", "isic_submission.csv"):
        assert storage.exists(f"{out}/{name}"), name
    for name in ("roc_per_class.png", "roc_malignant.png", "confusion.png", "reliability.png"):
        assert Image.open(io.BytesIO(storage.read_bytes(f"{out}/{name}"))).size[0] > 300
    metrics = json.loads(storage.read_text(f"{out}/metrics.json"))
    manifest = read_manifest(isic2018_manifest_local)
    assert manifest.classes == HAM
    assert metrics["images"] == manifest.split("test").num_rows
    # metrics.json agrees with scikit-learn recomputed on the written predictions.
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/predictions.parquet")))
    probs = np.stack([table[f"p_{c}"].to_numpy() for c in HAM], axis=1)
    labels = table["label"].to_numpy()
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    malignant = np.isin(labels, [HAM.index(c) for c in MALIGNANT])
    expected = roc_auc_score(malignant, probs[:, [HAM.index(c) for c in MALIGNANT]].sum(1))
    assert metrics["malignant_auc"] == pytest.approx(expected, abs=1e-6)
    assert metrics["melanoma_auc"] == pytest.approx(roc_auc_score(labels == HAM.index("mel"), probs[:, 4]), abs=1e-6)
    assert set(metrics["per_class"]) == set(HAM)
    assert set(metrics["malignant"]["sensitivity_at_specificity"]) == {"0.80", "0.90", "0.95"}
    report = storage.read_text(summary["report"])
    # ROC per class, malignant ROC, confusion, reliability, and the checkpoint's learning curves.
    assert report.count("data:image/png;base64,") == 5 and "balanced accuracy" in report
    assert "alt='curves.png'" in report
    assert isic_checkpoint in report and "Model configuration" in report
    assert summary["metrics"]["accuracy"] == metrics["accuracy"]
    assert summary["outputs"]["isic_submission"]["file"] == f"{out}/isic_submission.csv"
    assert metrics["trained_on"] == []  # the checkpoint trained on this manifest's train split only


def test_evaluating_a_split_the_checkpoint_trained_on_is_named(tmp_path, monkeypatch):
    """A figure on images the model trained on is not a held-out estimate: evaluate warns and metrics.json says
    which of them it trained on (the same manifest, however its path is written)."""
    monkeypatch.chdir(tmp_path)
    config = {"data": {"manifest": str(tmp_path / "ham" / "manifest.parquet"), "train_split": "train+test"}}
    assert trained_on_split(config, "./ham", "test") == ["test"]
    assert trained_on_split(config, str(tmp_path / "ham"), "val") == []
    assert trained_on_split(config, "./ham", "val+train") == ["train"]
    assert trained_on_split(config, "./isic2018-sample", "test") == []  # another collection's test split
    assert trained_on_split({"data": {"manifest": None}}, "./ham", "train") == []  # the embedded default


def test_tta_averages_eight_views(isic_checkpoint, isic2018_manifest_local, tmp_path):
    plain = evaluate(isic_checkpoint, isic2018_manifest_local, "val", str(tmp_path / "t1"), tta=1, bootstrap=0)
    tta = evaluate(isic_checkpoint, isic2018_manifest_local, "val", str(tmp_path / "t8"), tta=8, bootstrap=0)
    assert plain["metrics"]["images"] == tta["metrics"]["images"]

    def probabilities(out: str) -> np.ndarray:
        table = pq.read_table(f"{out}/predictions.parquet").to_pandas().sort_values("image_uri")
        return table[[f"p_{c}" for c in HAM]].to_numpy()

    one_view, eight_views = probabilities(str(tmp_path / "t1")), probabilities(str(tmp_path / "t8"))
    assert one_view.std(axis=0).max() > 1e-3  # the model tells images apart, so the comparison means something
    assert np.allclose(eight_views.sum(axis=1), 1.0, atol=1e-4)
    assert not np.allclose(one_view, eight_views, atol=1e-4)  # flipped/rotated views changed the average
    with pytest.raises(DermrayError, match="--tta must be between 1"):
        evaluate(isic_checkpoint, isic2018_manifest_local, "val", str(tmp_path / "t9"), tta=9)


def run_checkpoints(checkpoint: str) -> list[str]:
    """Every checkpoint the run of ``checkpoint`` kept (the folders, not Ray's snapshot file beside them)."""
    from pathlib import Path

    members = sorted(str(p) for p in Path(checkpoint).parent.glob("checkpoint_*") if p.is_dir())
    assert len(members) == 2  # run.checkpoints_to_keep: 2, of the fixture's 2 epochs
    return members


def test_an_ensemble_is_its_members_mean_image_by_image(isic_checkpoint, isic2018_manifest_local, tmp_path):
    """The run's last two checkpoints (epochs 1 and 2) as an ensemble: each image's probabilities are the mean of
    the two members' for that same image, whatever order Ray Data handed the rows back in, and every figure in
    metrics.json is the ensemble's."""
    from dermray.cli import build_parser

    members = run_checkpoints(isic_checkpoint)
    for name, checkpoint in (("a", members[0]), ("b", members[1]), ("ab", members)):
        evaluate(checkpoint, isic2018_manifest_local, "val", str(tmp_path / name), bootstrap=0)

    def predictions(out: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        table = pq.read_table(f"{tmp_path / out}/predictions.parquet").to_pandas().sort_values("image_uri")
        return list(table["image_uri"]), table[[f"p_{c}" for c in HAM]].to_numpy(), table["label"].to_numpy()

    (uris, a, labels), (uris_b, b, _), (uris_ab, ab, labels_ab) = map(predictions, ("a", "b", "ab"))
    assert uris == uris_b == uris_ab and (labels == labels_ab).all()
    assert np.abs(a - b).max() > 1e-3  # the members differ, so their mean is neither of them
    assert np.allclose(ab, (a + b) / 2, atol=1e-6)
    metrics = json.loads((tmp_path / "ab" / "metrics.json").read_text())
    assert metrics["checkpoints"] == [storage.normalize(m) for m in members]
    assert metrics["images"] == len(uris)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, ab.argmax(1)))
    report = (tmp_path / "ab" / "report.html").read_text()
    assert "an ensemble of 2" in report and "member 2" in report and "alt='curves.png'" not in report
    with pytest.raises(DermrayError, match="give each checkpoint once"):
        evaluate([members[0], members[0]], isic2018_manifest_local, "val", str(tmp_path / "twice"))
    # The command line takes --checkpoint more than once.
    args = build_parser().parse_args(["evaluate", "--checkpoint", members[0], "--checkpoint", members[1],
                                      "--manifest", isic2018_manifest_local])
    assert args.checkpoint == members


def test_ensemble_members_are_matched_by_image_not_by_position():
    """Rows come back from Ray Data in any order, and an image one member could not read has no ensemble
    prediction: it counts as unreadable rather than taking the other member's probabilities alone."""
    from dermray.evaluation.evaluate import SplitPredictions, ensemble_predictions

    def member(uris: list[str], labels: list[int], probs: list[list[float]], dropped: int) -> SplitPredictions:
        return SplitPredictions(uris, np.array(labels), np.array(probs), None, ["a", "b"], None, None, dropped)

    first = member(["x", "y", "z"], [0, 1, 1], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dropped=0)
    second = member(["z", "x"], [1, 0], [[0.2, 0.8], [0.5, 0.5]], dropped=1)  # y unreadable here
    joined = ensemble_predictions([first, second])
    assert joined.image_uris == ["x", "z"] and joined.labels.tolist() == [0, 1]
    assert np.allclose(joined.probs, [[0.7, 0.3], [0.4, 0.6]])
    assert joined.dropped == 1
    with pytest.raises(DermrayError, match="lists one image twice"):
        ensemble_predictions([member(["x", "x"], [0, 0], [[1, 0], [1, 0]], 0), first])


def test_predict_over_a_folder_reports_unreadable_images(isic_checkpoint, tmp_path):
    from tests.conftest import data_path

    folder = tmp_path / "incoming"
    folder.mkdir()
    for image in sorted(data_path("isic2018-sample", "images").iterdir())[:40]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image: not listed")
    summary = predict(isic_checkpoint, str(folder), str(tmp_path / "out"))
    assert summary["images"] == 41 and summary["unreadable"] == 1 and summary["predicted"] == 40
    table = pads.dataset(summary["predictions"], format="parquet").to_table().to_pandas()
    assert len(table) == 41
    broken = table[table["image_uri"].str.endswith("zz_broken.jpg")].iloc[0]
    assert "not an image" in broken["error"] and pd.isna(broken["predicted"])
    good = table[table["error"] == ""]
    assert np.allclose(good[[f"p_{c}" for c in HAM]].to_numpy().sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(good["p_malignant"] + good["p_benign"], 1.0, atol=1e-4)
    assert good["predicted"].isin(HAM).all()
    with pytest.raises(DermrayError, match="already holds predictions"):
        predict(isic_checkpoint, str(folder), str(tmp_path / "out"))


def test_predict_with_an_ensemble_averages_its_members(isic_checkpoint, tmp_path):
    """predict decodes each image once for every member and writes the mean of their probabilities; members that
    see images differently (another image size) or predict other classes are refused in one line before any
    work."""
    import shutil

    from tests.conftest import data_path

    members = run_checkpoints(isic_checkpoint)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for image in sorted(data_path("isic2018-sample", "images").iterdir())[:24]:
        (folder / image.name).write_bytes(image.read_bytes())

    def probabilities(checkpoint) -> np.ndarray:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        summary = predict(checkpoint, str(folder), str(out))
        assert summary["predicted"] == 24
        table = pads.dataset(summary["predictions"], format="parquet").to_table().to_pandas()
        return table.sort_values("image_uri")[[f"p_{c}" for c in HAM]].to_numpy()

    a, b, ab = probabilities(members[0]), probabilities(members[1]), probabilities(members)
    assert np.abs(a - b).max() > 1e-3  # the members differ, so their mean is neither of them
    assert np.allclose(ab, (a + b) / 2, atol=1e-5)
    other = tmp_path / "checkpoint_other_size"
    shutil.copytree(members[1], other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(meta | {"image_size": 96}))
    with pytest.raises(DermrayError, match="must share one view"):
        predict([members[0], str(other)], str(folder), str(tmp_path / "refused"))
    (other / "meta.json").write_text(json.dumps(meta | {"classes": list(reversed(meta["classes"]))}))
    with pytest.raises(DermrayError, match="predict the same classes"):
        predict([members[0], str(other)], str(folder), str(tmp_path / "refused"))
    with pytest.raises(DermrayError, match="give each checkpoint once"):
        predict([members[0], members[0]], str(folder), str(tmp_path / "twice"))


def test_predict_over_a_manifest_on_the_command_line(isic_checkpoint, isic2018_manifest_local, bucket, attached_env):
    result = subprocess.run([sys.executable, "-m", "dermray", "predict", "--checkpoint", isic_checkpoint,
                             "--input", isic2018_manifest_local, "--out", f"s3://{bucket}/predict"],
                            capture_output=True, text=True, timeout=600, env=attached_env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["input_kind"] == "manifest" and summary["images"] == 300 and summary["unreadable"] == 0
    assert sum(summary["per_class"].values()) == 300


def test_explain_writes_saliency_and_tsne(isic_checkpoint, isic2018_manifest_local, tmp_path):
    summary = explain(isic_checkpoint, isic2018_manifest_local, str(tmp_path / "explain"), per_class=2)
    saliency = Image.open(io.BytesIO(storage.read_bytes(summary["saliency"])))
    tsne = Image.open(io.BytesIO(storage.read_bytes(summary["tsne"])))
    assert saliency.size[0] > 400 and tsne.size[0] > 300
    assert summary["feature_dim"] == 512  # resnet18's penultimate layer
    test_counts = read_manifest(isic2018_manifest_local).class_counts("test")
    assert summary["saliency_examples"] == sum(min(2, n) for n in test_counts.values())  # 2 per class at most
    points = storage.read_text(summary["tsne_points"]).strip().splitlines()
    assert len(points) == summary["tsne_images"] + 1


def test_a_manifest_of_other_classes_is_refused(isic_checkpoint, tmp_path):
    from dermray.data.sources import SourceOptions
    from dermray.data.stage import stage

    other = stage("synthetic", SourceOptions(out=str(tmp_path), images_per_class=8, image_size=48))["manifest"]
    with pytest.raises(DermrayError, match="was trained on classes"):
        evaluate(isic_checkpoint, other)
