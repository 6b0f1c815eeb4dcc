"""Each source parser on the real metadata files in ../shared/data/metadata, with image folders the tests make
(only some of the listed images exist, so listed-but-absent rows must be counted, never guessed)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.data.sources import (
    SourceOptions,
    collect_csv,
    collect_folder,
    collect_ham10000,
    collect_isic2018,
    collect_isic2019,
    collect_isic2020,
    collect_medmnist,
)
from dermray.errors import DermrayError
from tests.conftest import data_path


def make_jpegs(folder: Path, names: list[str], size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / f"{name}.jpg"
        Image.new("RGB", size, (i * 7 % 255, 90, 120)).save(path, quality=85)
        paths.append(path)
    return paths


def test_ham10000_groups_by_lesion_and_counts_absent_files(tmp_path):
    metadata = data_path("metadata", "HAM10000_metadata.csv")
    frame = pd.read_csv(metadata)
    present = frame.head(50)
    make_jpegs(tmp_path / "part_1", list(present["image_id"][:25]))
    make_jpegs(tmp_path / "part_2", list(present["image_id"][25:]))  # HAM10000 ships two image folders
    collected = collect_ham10000(SourceOptions(out=str(tmp_path / "out"), images=str(tmp_path), labels=str(metadata)))
    assert collected.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert len(collected.records) == 50
    by_id = {Path(r.image_uri).stem: r for r in collected.records}
    for _, row in present.iterrows():
        assert by_id[row["image_id"]].label_name == row["dx"]
        assert by_id[row["image_id"]].group == row["lesion_id"]
    absent = [s for s in collected.skipped if "no such image file" in s[1]]
    assert len(absent) == len(frame) - 50


def test_isic2018_one_hot(tmp_path):
    truth = data_path("metadata", "ISIC2018_Task3_Validation_GroundTruth.csv")
    frame = pd.read_csv(truth)
    make_jpegs(tmp_path / "img", list(frame["image"][:40]))
    collected = collect_isic2018(SourceOptions(out="x", images=str(tmp_path / "img"), labels=str(truth)))
    columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    expected = {row["image"]: columns[int(np.argmax(row[columns].to_numpy()))].lower() for _, row in frame.iterrows()}
    assert len(collected.records) == 40
    assert all(r.label_name == expected[Path(r.image_uri).stem] for r in collected.records)
    assert collected.taxonomy == "ham10000"


def test_isic2019_one_hot_drops_empty_unk(tmp_path):
    truth = data_path("metadata", "ISIC_2019_Training_GroundTruth.csv")
    frame = pd.read_csv(truth)
    chosen = frame.groupby("MEL").head(15)  # some melanoma, some not
    make_jpegs(tmp_path / "img", list(chosen["image"]))
    collected = collect_isic2019(SourceOptions(out="x", images=str(tmp_path / "img"), labels=str(truth)))
    assert collected.classes == ["mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc"]  # UNK is empty in training
    assert sum(r.label_name == "mel" for r in collected.records) == 15
    assert len(collected.records) == 30


def test_isic2020_binary_target_grouped_by_patient(tmp_path):
    truth = data_path("metadata", "ISIC_2020_Training_GroundTruth.csv")
    frame = pd.read_csv(truth)
    chosen = pd.concat([frame[frame.target == 1].head(10), frame[frame.target == 0].head(20)])
    make_jpegs(tmp_path / "train", list(chosen["image_name"]))
    collected = collect_isic2020(SourceOptions(out="x", images=str(tmp_path / "train"), labels=str(truth)))
    assert collected.classes == ["benign", "malignant"]
    patients = dict(zip(chosen["image_name"], chosen["patient_id"]))
    assert {Path(r.image_uri).stem: r.group for r in collected.records} == patients
    assert sum(r.label_name == "malignant" for r in collected.records) == 10


def test_medmnist_keeps_its_own_splits(tmp_path):
    npz = tmp_path / "dermamnist_tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz,
        train_images=rng.integers(0, 255, (12, 28, 28, 3), dtype=np.uint8),
        train_labels=np.arange(12).reshape(-1, 1) % 7,
        val_images=rng.integers(0, 255, (5, 28, 28, 3), dtype=np.uint8),
        val_labels=np.arange(5).reshape(-1, 1) % 7,
    )
    collected = collect_medmnist(SourceOptions(out=str(tmp_path / "store"), npz=str(npz)))
    assert collected.classes[4] == "mel"
    assert [r.split for r in collected.records].count("train") == 12
    assert [r.split for r in collected.records].count("val") == 5
    first = np.asarray(Image.open(collected.records[0].image_uri))
    assert first.shape == (28, 28, 3)


def test_medmnist_real_dermamnist_shapes(tmp_path):
    npz = data_path("dermamnist", "dermamnist_28_trainval.npz")
    arrays = np.load(npz)
    assert arrays["train_images"].shape == (7007, 28, 28, 3)


def test_folder_source_and_non_image_files(tmp_path):
    make_jpegs(tmp_path / "benign", ["a", "b"])
    make_jpegs(tmp_path / "malignant", ["c"])
    (tmp_path / "malignant" / "notes.txt").write_text("not an image")
    collected = collect_folder(SourceOptions(out="x", images=str(tmp_path)))
    assert collected.classes == ["benign", "malignant"]
    assert sorted(r.label_name for r in collected.records) == ["benign", "benign", "malignant"]
    assert [reason for _, reason in collected.skipped] == ["not an image file extension"]


def test_csv_source_bad_rows_are_counted(tmp_path):
    make_jpegs(tmp_path / "img", ["x1", "x2", "x3", "x4"])
    (tmp_path / "labels.csv").write_text(
        "file,dx,patient\nx1.jpg,mel,p1\nx2.jpg,nv,p1\nx2.jpg,nv,p1\nx3.jpg,,p2\nghost.jpg,nv,p3\n"
    )
    collected = collect_csv(SourceOptions(out="x", images=str(tmp_path / "img"), labels=str(tmp_path / "labels.csv"),
                                          image_col="file", label_col="dx", group_col="patient"))
    assert sorted(r.label_name for r in collected.records) == ["mel", "nv"]
    reasons = sorted(reason for _, reason in collected.skipped)
    assert reasons == ["duplicate image id in labels file (first row kept)", "empty label",
                       "listed in labels file but no such image file"]
    assert [Path(u).name for u in collected.unlisted] == ["x4.jpg"]


def test_unknown_label_with_declared_classes_is_skipped(tmp_path):
    make_jpegs(tmp_path / "img", ["x1", "x2"])
    (tmp_path / "labels.csv").write_text("image,label\nx1,mel\nx2,zebra\n")
    collected = collect_csv(SourceOptions(out="x", images=str(tmp_path / "img"), labels=str(tmp_path / "labels.csv"),
                                          classes=("mel", "nv")))
    assert [r.label_name for r in collected.records] == ["mel"]
    assert "unknown label 'zebra'" in collected.skipped[0][1]


def test_missing_column_is_one_line_error(tmp_path):
    make_jpegs(tmp_path / "img", ["x1"])
    (tmp_path / "labels.csv").write_text("image,diagnosis\nx1,mel\n")
    with pytest.raises(DermrayError, match="has no column 'label'"):
        collect_csv(SourceOptions(out="x", images=str(tmp_path / "img"), labels=str(tmp_path / "labels.csv")))


def test_wrong_image_folder_is_one_line_error(tmp_path):
    make_jpegs(tmp_path / "img", ["unrelated"])
    (tmp_path / "labels.csv").write_text("image,label\nx1,mel\nx2,nv\n")
    with pytest.raises(DermrayError, match="none of the 2 images"):
        collect_csv(SourceOptions(out="x", images=str(tmp_path / "img"), labels=str(tmp_path / "labels.csv")))
