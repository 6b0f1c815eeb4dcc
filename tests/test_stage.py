"""`dermray stage` end to end: a real local Ray instance probes every image, real S3 on loopback holds the
images and the manifest, and the CLI prints one JSON line (or one error line)."""

import io
import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from dermray.data.manifest import read_manifest
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from tests.conftest import data_path


def test_stage_real_isic_from_s3_into_s3(ray_local, isic2018_on_s3):
    out = f"{isic2018_on_s3}/staged"
    summary = stage(
        "csv",
        SourceOptions(out=out, images=f"{isic2018_on_s3}/images", labels=f"{isic2018_on_s3}/labels.csv",
                      image_col="file", label_col="dx"),
    )
    labels = pd.read_csv(data_path("isic2018-sample", "labels.csv"))
    assert summary["manifest"] == f"{out}/manifest.parquet"
    assert summary["images"] == len(labels) and summary["skipped"] == 0
    assert sum(summary["splits"].values()) == len(labels)
    manifest = read_manifest(summary["manifest"])
    table = manifest.table.to_pandas()
    assert set(table["width"]) == {600} and set(table["height"]) == {450}
    truth = dict(zip(labels["file"], labels["dx"]))
    assert all(truth[uri.rsplit("/", 1)[1]] == name for uri, name in zip(table["image_uri"], table["label_name"]))
    assert all(uri.startswith(f"{isic2018_on_s3}/images/") for uri in table["image_uri"])
    assert all(manifest.classes[lab] == name for lab, name in zip(table["label"], table["label_name"]))
    for split in ("train", "val", "test"):
        assert summary["per_class"][split]["nv"] > 0


def _bad_files(folder):
    folder.mkdir(parents=True)
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (180, 120, 100)).save(good, format="JPEG")
    data = good.getvalue()
    (folder / "good1.jpg").write_bytes(data)
    (folder / "good2.jpg").write_bytes(data)
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"this is not a jpeg")
    Image.new("L", (40, 40), 128).save(folder / "gray.png")
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(folder / "cmyk.jpg")


def test_bad_files_are_counted_skips_with_reasons(tmp_path, ray_local):
    _bad_files(tmp_path / "img" / "lesion")
    summary = stage("folder", SourceOptions(out=str(tmp_path / "out"), images=str(tmp_path / "img")))
    assert summary["images"] == 4  # good1, good2, gray (converted at read time), cmyk
    assert summary["skipped"] == 3
    report = pd.read_csv(tmp_path / "out" / "skipped.csv")
    reasons = dict(zip(report["image"].map(lambda p: p.rsplit("/", 1)[1]), report["reason"]))
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "text.jpg"}
    assert "truncated" in reasons["truncated.jpg"] and "empty" in reasons["empty.jpg"]


def test_restage_superset_keeps_splits(tmp_path, ray_local):
    folder = tmp_path / "img"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (32, 32), (i * 10, 50, 90)).save(folder / cls / f"{cls}{i}.png")
    out = str(tmp_path / "out")
    stage("folder", SourceOptions(out=out, images=str(folder)))
    first = read_manifest(out).table.to_pandas().set_index("image_uri")["split"]
    for cls in ("a", "b"):
        for i in range(20, 30):
            Image.new("RGB", (32, 32), (i * 5, 50, 90)).save(folder / cls / f"{cls}{i}.png")
    stage("folder", SourceOptions(out=out, images=str(folder)))
    second = read_manifest(out).table.to_pandas().set_index("image_uri")["split"]
    assert len(second) == 60
    assert (second.loc[first.index] == first).all()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dermray", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_stage_prints_one_json_line(tmp_path, attached_env):
    for cls in ("benign", "malignant"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (i * 30, 60, 90)).save(tmp_path / "img" / cls / f"{i}.jpg")
    # As a user's shell runs it: without the Ray Data log level this test process inherited from dermray's import.
    env = {key: value for key, value in attached_env.items() if key != "RAY_DATA_LOG_LEVEL"}
    result = _cli("stage", "folder", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 12 and summary["skipped"] == 0
    assert pq.read_table(summary["manifest"]).num_rows == 12
    # stderr is a pipe here: no progress bars, and none of Ray Data's INFO lines (plans, 10 s progress blocks).
    assert "streaming_executor" not in result.stderr and "logging_progress" not in result.stderr, result.stderr


def test_cli_bad_input_is_one_line_error(tmp_path):
    (tmp_path / "labels.csv").write_text("image,diagnosis\nx,mel\n")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "x.jpg")
    result = _cli("stage", "csv", "--labels", str(tmp_path / "labels.csv"), "--images", str(tmp_path / "img"),
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "has no column 'label'" in result.stderr and "Traceback" not in result.stderr
